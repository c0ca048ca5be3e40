"""Download + decode + resize + encode throughput: bm6b vs img2dataset 1.47 vs a bare Pillow loop.

The same photos are served from memory by a keep-alive HTTP/1.1 server on 127.0.0.1 (its own
process), then fetched, decoded, centre-cropped to 256x256 and encoded as JPEG quality 95 by the
contenders below. All of them resize with lanczos when enlarging and area averaging when shrinking
(img2dataset's defaults and bm6b's; Pillow's BOX filter is the area filter):

- ``bare``: a Pillow loop over the bytes already in memory (no network, no checks), in 1 and in
  N processes (N = --cores); the N-process loop is the ceiling;
- ``bm6b``: ``RecordDownloader`` (fetch with all guards, decode with orientation/ICC/alpha
  handling, pHash, resize, encode) on a thread pool in each of --bm6b-processes processes
  (default 1, like one Beam worker), writing tars;
- ``bm6b-beam``: the ``Download`` PTransform on Beam's FnApiRunner (multi_processing when
  --bm6b-processes is above 1);
- ``img2dataset``: ``img2dataset.download`` with N processes, webdataset output.

Each contender runs in a fresh Python process, in rotating order, ``--repeats`` times; the table
reports the median. "work" rates exclude interpreter start-up and imports: the span from the first
process starting its slice (its shard, for img2dataset) to the last one finishing. For bm6b-beam,
work includes Beam's worker start-up. "wall" rates include everything.

    python benchmarks/download.py --images-dir ../shared/data/raw/flickr8k-images/images
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "raw" / "flickr8k-images" / "images"


# ---------------------------------------------------------------- the loopback server


def serve(folder: str, names: list[str], port_pipe) -> None:
    """Serve the files from memory with HTTP/1.1 keep-alive until killed."""
    files = {f"/{name}": (Path(folder) / name).read_bytes() for name in names}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                path = request_line.split(" ")[1]
                close = any(h.lower().startswith("connection:") and "close" in h.lower() for h in header_lines)
                close = close or request_line.endswith("HTTP/1.0")
                body = files.get(path)
                status = "200 OK" if body is not None else "404 Not Found"
                body = body if body is not None else b"not found"
                headers = f"HTTP/1.1 {status}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
                headers += "Connection: close\r\n\r\n" if close else "\r\n"
                writer.write(headers.encode("latin-1") + body)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port_pipe.send(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------- contenders (each run in a fresh process)

BARE = """
import io, json, multiprocessing, sys, time
from pathlib import Path
from PIL import Image
folder, names, processes = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])

def work(data):
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    resample = Image.Resampling.LANCZOS if side < 256 else Image.Resampling.BOX
    image = image.resize((256, 256), resample, box=box, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return len(out.getvalue())

def run_slice(index):
    datas = [(Path(folder) / n).read_bytes() for n in names[index::processes]]
    started, cpu = time.time(), time.process_time()
    sizes = [work(d) for d in datas]
    return len(sizes), started, time.time(), time.process_time() - cpu

if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        spans = pool.map(run_slice, range(processes))
    work_s = max(s[2] for s in spans) - min(s[1] for s in spans)
    print(json.dumps({"ok": sum(s[0] for s in spans), "work_s": work_s, "cpu_s": sum(s[3] for s in spans)}))
"""

BM6B = """
import concurrent.futures, io, json, multiprocessing, sys, tarfile, time
from bm6b.filters.download import FetchConfig
from bm6b.filters.download_record import RecordDownloader, iter_download
from bm6b.filters.image import ImageConfig
urls, threads, out, processes = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def run_slice(index):
    downloader = RecordDownloader(FetchConfig(allow_networks=("127.0.0.0/8",), host_concurrency=0),
                                  ImageConfig(image_size=256, resize_mode="center_crop", jpeg_quality=95))
    records = [{"key": f"{i:016x}", "url": u} for i, u in enumerate(urls)][index::processes]
    started, cpu = time.time(), time.process_time()
    ok, reasons = 0, {}
    with tarfile.open(f"{out}.{index}", "w") as tar, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for record, reason, _ in iter_download(downloader, records, pool, max_in_flight=threads * 4):
            if reason is not None:
                reasons[reason] = reasons.get(reason, 0) + 1
                continue
            ok += 1
            info = tarfile.TarInfo(record["key"] + ".jpg")
            info.size = len(record["image"])
            tar.addfile(info, io.BytesIO(record["image"]))
    return ok, started, time.time(), reasons, time.process_time() - cpu

if __name__ == "__main__":
    # fork after the imports, as img2dataset's pool processes are each started before their shard's timer.
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        spans = pool.map(run_slice, range(processes))
    work_s = max(s[2] for s in spans) - min(s[1] for s in spans)
    rejects = {}
    for span in spans:
        for reason, count in span[3].items():
            rejects[reason] = rejects.get(reason, 0) + count
    print(json.dumps({"ok": sum(s[0] for s in spans), "work_s": work_s, "rejects": rejects,
                      "cpu_s": sum(s[4] for s in spans)}))
"""

BM6B_BEAM = """
import json, sys, time
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from bm6b.filters.download import FetchConfig
from bm6b.filters.image import ImageConfig
from bm6b.pipelines import stages
urls, threads, out, processes = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
records = [{"key": f"{i:016x}", "url": u} for i, u in enumerate(urls)]
fetch = FetchConfig(allow_networks=("127.0.0.0/8",), host_concurrency=0)
image = ImageConfig(image_size=256, resize_mode="center_crop", jpeg_quality=95)
options = ["--runner=FnApiRunner"]
if processes > 1:
    options += ["--direct_running_mode=multi_processing", f"--direct_num_workers={processes}"]
started = time.perf_counter()
with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
    result = (pipeline | beam.Create(records) | beam.Reshuffle()
              | stages.Download(fetch, image, threads=threads))
    _ = (result.records | beam.Map(lambda r: 1) | beam.CombineGlobally(sum)
         | beam.Map(lambda n: open(out, "w").write(str(n))))
print(json.dumps({"ok": int(open(out).read()), "work_s": time.perf_counter() - started}))
"""

IMG2DATASET = """
import glob, json, os, sys, time
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
import img2dataset

if __name__ == "__main__":
    url_list, out, processes, threads, per_shard = sys.argv[1:6]
    started = time.perf_counter()
    img2dataset.download(
        url_list=url_list, input_format="parquet", url_col="url", output_folder=out,
        output_format="webdataset", image_size=256, resize_mode="center_crop", encode_quality=95,
        encode_format="jpg", processes_count=int(processes), thread_count=int(threads),
        number_sample_per_shard=int(per_shard), timeout=10, retries=0, enable_wandb=False,
    )
    total = time.perf_counter() - started
    stats = [json.load(open(p)) for p in glob.glob(out + "/*_stats.json")]
    ok = sum(s["successes"] for s in stats)
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    print(json.dumps({"ok": ok, "work_s": span, "inner_total_s": total}))
"""


def profile_steps(folder: Path, names: list[str], repeats: int = 3) -> dict[str, float]:
    """Return CPU milliseconds per image for each step, best of ``repeats``, from one thread, no network.

    CPU time, counted over all of the process's threads, and best-of timing keep the number close
    to the code's own cost on a machine shared with other jobs.
    """
    import hashlib
    import io

    import numpy as np
    from PIL import Image

    from bm6b.filters.image import ImageConfig, compute_phash, decode_image, encode, process_image, resize

    config = ImageConfig(image_size=256, resize_mode="center_crop", jpeg_quality=95)
    datas = [(folder / name).read_bytes() for name in names]

    def bare(data):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        width, height = image.size
        side = min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        resample = Image.Resampling.LANCZOS if side < 256 else Image.Resampling.BOX
        image = image.resize((256, 256), resample, box=box, reducing_gap=3.0)
        image.save(io.BytesIO(), format="JPEG", quality=95)

    decoded = [decode_image(d, config)[0] for d in datas]
    resized = [resize(image, config) for image in decoded]
    steps = {
        "bare Pillow loop": (bare, datas),
        "bm6b process_image (all below)": (lambda d: process_image(d, config), datas),
        "  sha256 of the original": (lambda d: hashlib.sha256(d).hexdigest(), datas),
        "  sniff + decode + sRGB + orientation": (lambda d: decode_image(d, config), datas),
        "  pHash": (compute_phash, decoded),
        "  centre crop + resize (lanczos up, area down)": (lambda image: resize(image, config), decoded),
        "  JPEG q95 encode": (lambda image: encode(image, config), resized),
    }
    try:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        import cv2

        def opencv(data):
            array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            height, width = array.shape[:2]
            side = min(width, height)
            top, left = (height - side) // 2, (width - side) // 2
            array = array[top : top + side, left : left + side]
            interpolation = cv2.INTER_LANCZOS4 if side < 256 else cv2.INTER_AREA
            cv2.imencode(".jpg", cv2.resize(array, (256, 256), interpolation=interpolation),
                         [int(cv2.IMWRITE_JPEG_QUALITY), 95])

        steps["OpenCV loop as in img2dataset's resizer"] = (opencv, datas)
    except ImportError:
        pass

    costs = {}
    for name, (function, items) in steps.items():
        best = float("inf")
        for _ in range(repeats):
            started = time.process_time()
            for item in items:
                function(item)
            best = min(best, (time.process_time() - started) / len(items))
        costs[name] = best * 1000
    return costs


IMG2DATASET_INPROC = """
import json, os, sys, time
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
import pyarrow as pa
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter
urls, threads, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.makedirs(out)
table = pa.table({"url": urls})
shard = os.path.join(out, "shard.feather")
with pa.OSFile(shard, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
    writer.write_table(table)
downloader = Downloader(
    sample_writer_class=WebDatasetSampleWriter, resizer=Resizer(image_size=256, resize_mode="center_crop",
    resize_only_if_bigger=False, encode_quality=95), thread_count=threads, save_caption=False,
    extract_exif=True, output_folder=out, column_list=["url"], timeout=10, number_sample_per_shard=len(urls),
    oom_shard_count=5, compute_hash="sha256", verify_hash_type=None, encode_format="jpg", retries=0,
    user_agent_token=None, disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
)
started, cpu = time.perf_counter(), time.process_time()
downloader((0, shard))
work_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
stats = json.load(open(os.path.join(out, "00000_stats.json")))
print(json.dumps({"ok": stats["successes"], "work_s": work_s, "cpu_s": cpu_s}))
"""


def run_contender(name: str, script: str, args: list[str], workdir: Path, cores: str) -> dict:
    path = workdir / f"contender_{name.replace('-', '_')}.py"  # "bm6b.py" would shadow the package
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = ["taskset", "-c", cores, sys.executable, str(path), *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-dir", default=str(DEFAULT_IMAGES), help="folder of JPEG photos to serve")
    parser.add_argument("--images", type=int, default=1000, help="number of photos (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender; the median is reported")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores for every contender, pinned with taskset (default: all)")
    parser.add_argument("--threads", type=int, default=4,
                        help="download threads per process for bm6b and img2dataset; loopback needs few (default: %(default)s)")
    parser.add_argument("--bm6b-processes", type=int, default=1,
                        help="processes for bm6b and bm6b-beam; 1 means one worker with a thread pool (default: %(default)s)")
    parser.add_argument("--skip", action="append", default=[], help="skip a contender (bare, bm6b, bm6b-beam, img2dataset)")
    parser.add_argument("--json", help="write all runs and medians to this file")
    parser.add_argument("--profile", action="store_true", help="print per-step costs instead of running the contenders")
    args = parser.parse_args()

    folder = Path(args.images_dir)
    if args.profile:
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[: args.images]
        print(f"CPU ms per image, one calling thread, best of 3, {len(names)} photos")
        for name, cost in profile_steps(folder, names).items():
            print(f"{name:<50}{cost:8.2f}")
        return
    if not folder.is_dir():
        sys.exit(f"images folder {folder} not found; pass --images-dir")
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[: args.images]
    cores = f"0-{args.cores - 1}"

    receiver, sender = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.Process(target=serve, args=(str(folder), names, sender), daemon=True)
    server.start()
    port = receiver.recv()
    urls = [f"http://127.0.0.1:{port}/{name}" for name in names]

    import pyarrow as pa
    import pyarrow.parquet as pq

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bm6b-bench-") as tmp:
        work = Path(tmp)
        pq.write_table(pa.table({"url": urls}), work / "urls.parquet")
        contenders = {
            "bare-1": (BARE, [str(folder), json.dumps(names), "1"]),
            f"bare-{args.cores}": (BARE, [str(folder), json.dumps(names), str(args.cores)]),
            "bm6b": (BM6B, [json.dumps(urls), str(args.threads), str(work / "bm6b.tar"), str(args.bm6b_processes)]),
            "bm6b-beam": (BM6B_BEAM, [json.dumps(urls), str(args.threads), str(work / "beam.txt"),
                                      str(args.bm6b_processes)]),
            "img2dataset-1proc": (IMG2DATASET_INPROC, [json.dumps(urls), str(args.threads), "OUT"]),
            "img2dataset": (IMG2DATASET, [str(work / "urls.parquet"), "OUT", str(args.cores), str(args.threads),
                                          str(-(-len(urls) // args.cores))]),
        }
        contenders = {k: v for k, v in contenders.items() if k.split("-")[0] not in args.skip and k not in args.skip}
        order = list(contenders)
        for repeat in range(args.repeats):
            rotated = order[repeat % len(order):] + order[: repeat % len(order)]
            for name in rotated:
                script, script_args = contenders[name]
                script_args = [str(work / f"{name}-{repeat}") if a == "OUT" else a for a in script_args]
                result = run_contender(name, script, script_args, work, cores)
                runs.setdefault(name, []).append(result)
                print(f"run {repeat + 1} {name:<18} ok={result['ok']:<5} work {result['work_s']:7.2f}s "
                      f"wall {result['wall_s']:7.2f}s", flush=True)
    server.kill()

    medians = {}
    for name, results in runs.items():
        work_s = statistics.median(r["work_s"] for r in results)
        wall_s = statistics.median(r["wall_s"] for r in results)
        ok = min(r["ok"] for r in results)
        cpu = [r["cpu_s"] for r in results if r.get("cpu_s") is not None]
        cpu_ms = 1000 * statistics.median(cpu) / ok if cpu and ok else None
        medians[name] = {"ok": ok, "work_rate": ok / work_s, "wall_rate": ok / wall_s, "work_s": work_s,
                         "wall_s": wall_s, "cpu_ms_per_image": cpu_ms}

    print(f"\n{len(names)} photos from {folder}, {args.cores} core(s), {args.threads} threads, median of {args.repeats}")
    print(f"{'contender':<18}{'ok':>6}{'work img/s':>12}{'wall img/s':>12}{'CPU ms/img':>12}")
    for name, m in medians.items():
        cpu_ms = f"{m['cpu_ms_per_image']:.2f}" if m["cpu_ms_per_image"] is not None else "-"
        print(f"{name:<18}{m['ok']:>6}{m['work_rate']:>12.1f}{m['wall_rate']:>12.1f}{cpu_ms:>12}")
    if "bm6b" in medians:
        bm6b = medians["bm6b"]["work_rate"]
        for peer in ("img2dataset", "img2dataset-1proc", f"bare-{args.cores}", "bare-1"):
            if peer in medians:
                print(f"bm6b / {peer}: {bm6b / medians[peer]['work_rate']:.2f}x (work rate)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": medians, "images": len(names),
                                               "cores": args.cores, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()

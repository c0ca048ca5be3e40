"""Curate Flickr8k from a loopback server, train a small model on CPU, and evaluate zh/en retrieval.

Steps:
1. Serve the Flickr8k photos on 127.0.0.1 and run ``run_curate`` once per split and caption
   number N. The photos are research-use data in ``../shared/data/raw`` and are never copied
   into the repository. A train manifest has one row per photo with Chinese caption N (written
   by native speakers) and English caption N. A test manifest has English caption N and its
   human Chinese translation. Curate keeps one row per image per run (exact sha256 dedup), so
   the N runs give each photo up to 5 captions per language. Evaluation groups them by image.
2. Train a bilingual BPE tokenizer on the train shards' captions.
3. Train a small model (``--model``, default ``bm6b-tiny``) with the grouped ITC loss in one
   process, then run zero-shot retrieval on the test shards for the trained and the untrained model.

Run: ``python benchmarks/train_flickr8k.py --work /tmp/flickr-run --model bm6b-small-resnet --steps 800
--threads 1``. Curated shards in WORK are reused, so later runs with another ``--run`` name only
train and evaluate. Writes ``WORK/RUN/results.json``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RAW = REPO.parent / "shared" / "data" / "raw"

logger = logging.getLogger("train_flickr8k")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 serving one folder."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def read_captions(path: Path, tag: str, index: int) -> dict[str, str]:
    """Return image file name -> caption number ``index`` from a Flickr8k-CN file (``IMG.jpg#tag#N caption``)."""
    captions = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        ident, _, caption = line.partition(" ")
        image, _, number = ident.partition(f"#{tag}#")
        if number == str(index) and caption.strip():
            captions[image] = caption.strip()
    return captions


def split_rows(raw: Path, split: str, base_url: str, caption_index: int = 0) -> list[dict]:
    """Build manifest rows (url, caption_zh, caption_en) for the photos of one split."""
    folder = raw / "flickr8k-cn"
    ids = set((folder / f"flickr8k{split}.txt").read_text().split())
    english = read_captions(folder / "flickr8kenc.caption.txt", "enc", caption_index)
    if split == "test":
        chinese = read_captions(folder / "flickr8kzhmtest.captions.txt", "zhm", caption_index)
    else:
        chinese = read_captions(folder / "flickr8kzhc.caption.txt", "zhc", caption_index)
    images = sorted(p.name for p in (raw / "flickr8k-images" / "images").glob("*.jpg"))
    rows = []
    for name in images:
        if name.removesuffix(".jpg") in ids and name in english:
            rows.append({"url": f"{base_url}/{name}", "caption_en": english[name], "caption_zh": chinese.get(name)})
    return rows


def curate_split(raw: Path, split: str, work: Path, caption_index: int = 0, samples_per_shard: int = 200) -> list[str]:
    """Curate one split with ``run_curate`` from a loopback server; return the tar paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bm6b.filters.download import FetchConfig
    from bm6b.pipelines.curate import CurateConfig, run_curate

    output = work / f"shards-{split}-{caption_index}"
    tars = sorted(output.glob("[0-9]*.tar"))
    if tars and (output / "stats.json").is_file():
        return [str(p) for p in tars]
    server = LoopbackServer(raw / "flickr8k-images" / "images")
    try:
        manifest = work / f"manifest-{split}-{caption_index}.parquet"
        work.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(split_rows(raw, split, server.base_url, caption_index)), manifest)
        config = CurateConfig(
            inputs=[str(manifest)],
            output=str(output),
            fetch=FetchConfig(allow_networks=("127.0.0.0/8",), timeout=5.0),
            samples_per_shard=samples_per_shard,
            overwrite=True,
        )
        stats = run_curate(config)
        logger.info("curated %s: %d of %d rows kept", split, stats["kept"], stats["input_rows"])
    finally:
        server.close()
    return [str(p) for p in sorted(output.glob("[0-9]*.tar"))]


def run(args) -> dict:
    import torch

    from bm6b.train.data import read_samples
    from bm6b.train.evaluate import evaluate, load_for_eval
    from bm6b.train.tokenizer import train_bilingual_tokenizer
    from bm6b.train.trainer import TrainConfig, read_metrics, train

    work = Path(args.work)
    raw = Path(args.raw)
    started = time.monotonic()
    train_shards = []
    for index in range(args.caption_variants):
        train_shards += curate_split(raw, "train", work, caption_index=index)
    test_shards = []
    for index in range(args.caption_variants):
        test_shards += curate_split(raw, "test", work, caption_index=index)
    curate_s = time.monotonic() - started

    tokenizer_path = work / "tokenizer.json"
    captions = []
    for sample in read_samples(train_shards):
        for lang in ("zh", "en"):
            if sample.get(f"{lang}.txt"):
                captions.append(sample[f"{lang}.txt"].decode("utf-8"))
    train_bilingual_tokenizer(captions, args.vocab_size, tokenizer_path)

    torch.set_num_threads(args.threads)
    run_dir = work / args.run
    config = TrainConfig(
        shards=train_shards,
        output=str(run_dir),
        model=args.model,
        tokenizer=str(tokenizer_path),
        context_length=args.context_length,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        workers=args.workers,
        text_policy=args.text_policy,
        mask_duplicates=not args.no_mask_duplicates,
        seed=args.seed,
        crop_scale_min=args.crop_scale_min,
        save_every=args.save_every,
        log_every=10,
        resume="auto",
        progress=False,
    )
    load_before = os.getloadavg()
    started, cpu_started = time.monotonic(), os.times()
    last = train(config)
    train_s = time.monotonic() - started
    cpu_ended = os.times()
    # The loader workers have exited by now, so their CPU time is in the children's fields.
    train_cpu_s = sum(cpu_ended[i] - cpu_started[i] for i in range(4))

    results = {
        "train_samples": sum(1 for _ in read_samples(train_shards)),
        "test_samples": sum(1 for _ in read_samples(test_shards)),
        "curate_s": round(curate_s, 1),
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "final": last,
        "config": {k: v for k, v in vars(args).items()},
    }
    model, preprocess, tokenizer = load_for_eval(str(run_dir / "last.pt"), args.model, str(tokenizer_path), "cpu")
    results["trained"] = evaluate(model, preprocess, tokenizer, test_shards)
    model, preprocess, tokenizer = load_for_eval(None, args.model, str(tokenizer_path), "cpu", seed=0)
    results["untrained"] = evaluate(model, preprocess, tokenizer, test_shards)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    results["loss_curve"] = {step: round(record["loss"], 4) for step, record in sorted(metrics.items())}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Curate Flickr8k, train a small model on CPU, evaluate zh/en retrieval.")
    parser.add_argument("--raw", default=str(DEFAULT_RAW), help="folder with flickr8k-images/ and flickr8k-cn/")
    parser.add_argument("--work", required=True, help="working folder for manifests, shards and runs")
    parser.add_argument("--model", default="bm6b-tiny", help="open_clip model config (default: bm6b-tiny)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step (default: 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    parser.add_argument("--warmup", type=int, default=50, help="warmup steps (default: 50)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers (default: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--vocab-size", type=int, default=4000, help="bilingual BPE vocabulary (default: 4000)")
    parser.add_argument("--context-length", type=int, default=32, help="text tokens per caption (default: 32)")
    parser.add_argument("--caption-variants", type=int, default=5, help="curate each split this many times, with caption number N in run N (1-5, default: 5)")
    parser.add_argument("--text-policy", choices=("random", "zh", "en", "both"), default="random", help="text views per sample, as in `bm6b train --text-policy` (default: random)")
    parser.add_argument("--no-mask-duplicates", action="store_true", help="treat pairs of a step that share a photo as negatives, as plain CLIP does")
    parser.add_argument("--run", default="run", help="subfolder of WORK for the checkpoint, metrics and results.json; an existing one is resumed (default: run)")
    parser.add_argument("--crop-scale-min", type=float, default=0.5, help="smallest area fraction of the training crop (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentation (default: 0)")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (Path(args.raw) / "flickr8k-images").is_dir():
        print(f"error: {args.raw}/flickr8k-images not found; pass --raw", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = run(args)
    from bm6b.train.evaluate import format_results

    print("trained:\n" + format_results(results["trained"]))
    print("untrained:\n" + format_results(results["untrained"]))
    print(json.dumps({k: results[k] for k in ("train_samples", "test_samples", "curate_s", "train_s", "train_cpu_s", "load_average")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

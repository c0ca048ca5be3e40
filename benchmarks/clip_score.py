"""CLIP scoring throughput: the Beam RunInference stage against a plain open_clip batch loop.

Both sides score the same images with the same captions (one Chinese and one English caption per
image), the same model, weights, device, precision and batch size, in the same process. Each run
times the whole job from start to finish, model loading included:

- plain loop: ``open_clip.create_model_and_transforms``, then per batch decode the JPEGs, apply
  the image transform, tokenize, ``encode_image`` / ``encode_text`` and the cosine;
- Beam: an in-process ``FnApiRunner`` pipeline that reads the same records from a file and runs
  ``bm6b.pipelines.stages.ClipScore`` (decode + transform + tokenize in a ParDo, then
  ``RunInference`` with ``BatchElements`` fixed to the batch size).

One untimed round on two batches warms up imports and caches first. Then both run in each of
``--runs`` rounds, in alternating order; the summary reports medians and their ratio (Beam
throughput / plain throughput).
Photos come from ``--photos`` (default: the Flickr8k photos in ../shared/data/raw, which stay
outside the repository); without them the script draws synthetic images.

    python benchmarks/clip_score.py                      # ViT-B-32, random init, 224 px, CPU
    python benchmarks/clip_score.py --device cuda --precision fp16 --images 4096 --batch-size 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RAW = REPO.parent / "shared" / "data" / "raw"


def read_flickr8k(raw: Path, limit: int) -> list[dict]:
    """Return up to ``limit`` records of Flickr8k photos with their first zh and en caption."""
    def first_captions(path: Path, tag: str) -> dict[str, str]:
        captions = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            ident, _, caption = line.partition(" ")
            image, _, number = ident.partition(f"#{tag}#")
            if number == "0":
                captions[image] = caption
        return captions

    english = first_captions(raw / "flickr8k-cn" / "flickr8kenc.caption.txt", "enc")
    chinese = first_captions(raw / "flickr8k-cn" / "flickr8kzhc.caption.txt", "zhc")
    records = []
    for path in sorted((raw / "flickr8k-images" / "images").glob("*.jpg")):
        if path.name in english and path.name in chinese:
            records.append({"key": f"{len(records):016x}", "image": path.read_bytes(),
                            "caption_zh": chinese[path.name], "caption_en": english[path.name]})
        if len(records) == limit:
            break
    return records


def synthetic_records(limit: int) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(limit):
        pixels = rng.integers(0, 256, size=(180, 240, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        records.append({"key": f"{i:016x}", "image": buffer.getvalue(),
                        "caption_zh": f"第{i}张随机图片", "caption_en": f"random picture number {i}"})
    return records


def load_records(args) -> tuple[list[dict], str]:
    photos = Path(args.photos) if args.photos else DEFAULT_RAW
    if (photos / "flickr8k-images" / "images").is_dir():
        records = read_flickr8k(photos, args.images)
        source = f"Flickr8k photos ({len(records)})"
    else:
        records, source = synthetic_records(args.images), f"synthetic 240x180 JPEGs ({args.images})"
    while len(records) < args.images:  # fewer photos than requested: repeat them under new keys
        extra = dict(records[len(records) % max(len(records), 1)])
        extra["key"] = f"{len(records):016x}"
        records.append(extra)
    return records, source


def plain_loop(records: list[dict], args) -> tuple[float, dict[str, dict]]:
    """Score with open_clip directly; return (seconds, key -> scores)."""
    from bm6b.models import register_model_configs
    from bm6b.models.loading import RANDOM_INIT_SEED

    started = time.perf_counter()
    register_model_configs()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(args.model)
    model = model.to(device=args.device, dtype=dtype).eval()
    tokenizer = open_clip.get_tokenizer(args.model)

    scores = {}
    with torch.inference_mode():
        for start in range(0, len(records), args.batch_size):
            batch = records[start : start + args.batch_size]
            images = torch.stack([preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in batch])
            image_features = model.encode_image(images.to(args.device, dtype), normalize=True)
            for language in ("zh", "en"):
                tokens = tokenizer([r[f"caption_{language}"] for r in batch]).to(args.device)
                text_features = model.encode_text(tokens, normalize=True)
                values = (image_features.float() * text_features.float()).sum(-1).cpu().tolist()
                for record, value in zip(batch, values):
                    scores.setdefault(record["key"], {})[language] = value
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, scores


def _read_pickled(path: str):
    with open(path, "rb") as handle:
        yield from pickle.load(handle)


def beam_stage(records_path: str, output: str, args) -> tuple[float, dict[str, dict]]:
    """Score with the curate CLIP stage on the in-process runner; return (seconds, key -> scores)."""
    from bm6b.pipelines import stages
    from bm6b.pipelines.clip_inference import ClipModelSpec, ClipStageConfig

    def scores_line(record):
        return json.dumps({"key": record["key"], "zh": record["clip_score_zh"], "en": record["clip_score_en"]})

    started = time.perf_counter()
    spec = ClipModelSpec(args.model, device=args.device, precision=args.precision)
    config = ClipStageConfig(models={"zh": spec, "en": spec}, min_batch_size=args.batch_size,
                             max_batch_size=args.batch_size)
    pipeline = beam.Pipeline(runner="FnApiRunner")
    scored = (
        pipeline
        | "Path" >> beam.Create([records_path])
        | "Read" >> beam.FlatMap(_read_pickled)
        | "ClipScore" >> stages.ClipScore(config)
    )
    _ = scored.records | "Scores" >> beam.Map(scores_line) | "Write" >> beam.io.WriteToText(output, shard_name_template="")
    pipeline.run().wait_until_finish()
    elapsed = time.perf_counter() - started

    scores = {}
    for line in Path(output).read_text().splitlines():
        row = json.loads(line)
        scores[row["key"]] = {"zh": row["zh"], "en": row["en"]}
    return elapsed, scores


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip config, random init (default: ViT-B-32)")
    parser.add_argument("--images", type=int, default=128, help="images per run (default: 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call on both sides (default: 32)")
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds of both sides (default: 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--photos", help="folder holding flickr8k-images/ and flickr8k-cn/ (default: ../shared/data/raw)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    records, source = load_records(args)
    with tempfile.TemporaryDirectory(prefix="bm6b-clip-bench-") as folder:
        records_path = os.path.join(folder, "records.pkl")
        with open(records_path, "wb") as handle:
            pickle.dump(records, handle)

        warmup_path = os.path.join(folder, "warmup.pkl")
        with open(warmup_path, "wb") as handle:
            pickle.dump(records[: 2 * args.batch_size], handle)
        plain_loop(records[: 2 * args.batch_size], args)
        beam_stage(warmup_path, os.path.join(folder, "warmup.jsonl"), args)

        plain_times, beam_times, max_difference = [], [], 0.0
        for run in range(args.runs):
            # Odd rounds run Beam first, so a change in background load hits both sides alike.
            output = os.path.join(folder, f"scores-{run}.jsonl")
            if run % 2 == 0:
                plain_seconds, plain_scores = plain_loop(records, args)
                beam_seconds, beam_scores = beam_stage(records_path, output, args)
            else:
                beam_seconds, beam_scores = beam_stage(records_path, output, args)
                plain_seconds, plain_scores = plain_loop(records, args)
            if set(beam_scores) != set(plain_scores):
                raise SystemExit(f"the Beam stage scored {len(beam_scores)} images, the plain loop {len(plain_scores)}")
            for key, languages in plain_scores.items():
                for language, value in languages.items():
                    max_difference = max(max_difference, abs(beam_scores[key][language] - value))
            plain_times.append(plain_seconds)
            beam_times.append(beam_seconds)
            print(f"run {run + 1}: plain {len(records) / plain_seconds:8.1f} images/s   "
                  f"beam {len(records) / beam_seconds:8.1f} images/s", flush=True)

    plain_median, beam_median = statistics.median(plain_times), statistics.median(beam_times)
    result = {
        "model": f"{args.model} (random init)",
        "device": args.device,
        "precision": args.precision,
        "images": len(records),
        "image_source": source,
        "batch_size": args.batch_size,
        "runs": args.runs,
        "plain_images_per_s": round(len(records) / plain_median, 2),
        "beam_images_per_s": round(len(records) / beam_median, 2),
        "ratio_beam_to_plain": round(plain_median / beam_median, 3),
        "max_abs_score_difference": max_difference,
        "plain_seconds": [round(t, 3) for t in plain_times],
        "beam_seconds": [round(t, 3) for t in beam_times],
        "machine": machine(),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())

"""End-to-end curate throughput on the 1,000 real Flickr8k photos served from 127.0.0.1.

Usage: python benchmarks/e2e_flickr8k.py [--runs 3] [--clip-model bm6b-tiny]
Prints samples/s of the whole job and of each stage's per-record function run alone (one core).
Needs ../shared/data/raw (research-use data, read in place).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import SHARED_RAW, LocalServer  # noqa: E402
from flickr8k import write_flickr8k_manifests  # noqa: E402


def time_pipeline(raw: Path, clip_model: str | None) -> float:
    from bm6b.filters.download import FetchConfig
    from bm6b.pipelines.curate import CurateConfig, run_curate

    server = LocalServer(raw / "flickr8k-images" / "images")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            facts = write_flickr8k_manifests(raw, Path(tmp) / "m", f"http://127.0.0.1:{server.port}")
            config = CurateConfig(
                inputs=facts["paths"],
                output=str(Path(tmp) / "out"),
                fetch=FetchConfig(allow_networks=("127.0.0.0/8",)),
                clip_model=clip_model,
                samples_per_shard=400,
            )
            started = time.perf_counter()
            stats = run_curate(config)
            elapsed = time.perf_counter() - started
            assert stats["input_rows"] == facts["rows"]
            return facts["rows"] / elapsed
    finally:
        server.close()


def time_stages(raw: Path, clip_model: str | None) -> dict[str, float]:
    """Samples/s of each stage's per-record function alone, in this process, over the same data."""
    from bm6b.filters import captions
    from bm6b.filters.download import FetchConfig, Fetcher
    from bm6b.filters.image import process_image
    from flickr8k import read_captions

    folder = raw / "flickr8k-images" / "images"
    names = sorted(p.name for p in folder.glob("*.jpg"))
    rates: dict[str, float] = {}

    server = LocalServer(folder)
    try:
        fetcher = Fetcher(FetchConfig(allow_networks=("127.0.0.0/8",)))
        started = time.perf_counter()
        bodies = [fetcher.fetch(server.url(n)).body for n in names]
        rates["download (fetch only, 1 thread)"] = len(names) / (time.perf_counter() - started)
    finally:
        server.close()

    started = time.perf_counter()
    processed = [process_image(b) for b in bodies]
    rates["decode+resize+encode+hash"] = len(names) / (time.perf_counter() - started)

    english = read_captions(raw / "flickr8k-cn" / "flickr8kenc.caption.txt", "enc")
    chinese = read_captions(raw / "flickr8k-cn" / "flickr8kzhc.caption.txt", "zhc")
    records = [{"caption_en": english[n], "caption_zh": chinese[n], "captions": []} for n in names]
    started = time.perf_counter()
    for record in records:
        captions.normalize_record(record)
    rates["caption normalization"] = len(records) / (time.perf_counter() - started)
    model = captions.load_lid_model()
    started = time.perf_counter()
    for record in records:
        captions.assign_languages(record, model)
    rates["language ID (2 captions)"] = len(records) / (time.perf_counter() - started)

    if clip_model:
        from bm6b.filters.clip import ClipScorer

        scorer = ClipScorer(clip_model)
        batch = [dict(r, image=p.jpeg) for r, p in zip(records, processed)]
        started = time.perf_counter()
        for i in range(0, len(batch), 64):
            scorer.score_batch(batch[i : i + 64])
        rates[f"CLIP score ({clip_model}, batch 64)"] = len(batch) / (time.perf_counter() - started)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clip-model", default="bm6b-tiny")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not SHARED_RAW.is_dir():
        sys.exit(f"real data folder {SHARED_RAW} not found")

    end_to_end = [time_pipeline(SHARED_RAW, args.clip_model) for _ in range(args.runs)]
    stage_runs = [time_stages(SHARED_RAW, args.clip_model) for _ in range(args.runs)]
    result = {
        "end_to_end_samples_per_s": {"median": statistics.median(end_to_end), "runs": end_to_end},
        "stages_alone_samples_per_s": {k: statistics.median(r[k] for r in stage_runs) for k in stage_runs[0]},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

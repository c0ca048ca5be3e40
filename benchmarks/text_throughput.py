"""Caption-stage throughput in pairs per second on one core, next to a plain fastText predict loop.

Usage: python benchmarks/text_throughput.py [--raw ../shared/data/raw] [--pairs 20000] [--repeats 3] [--encoder FILE]

Input: Flickr8k-CN pairs (English caption ``enc#N`` with its Baidu translation ``zhb#N``), the
first ``--pairs`` of them. Three loops run in the same process, taking turns, each ``--repeats``
times, and the median is reported:

* ``fasttext``: ``model.predict(text, k=1)`` on both captions of each pair, nothing else (the
  ceiling for anything that runs language ID);
* ``bm6b``: ``normalize_record`` + ``assign_languages_batch`` (normalization, boilerplate, language
  ID, quality rules, Chinese script) + ``check_translation`` on records holding the pairs, in
  batches of ``--batch`` records as the pipeline's language-ID stage runs them;
* ``bm6b_no_translate``: the same without the translate-check.

Everything runs in one thread, and the rates divide by the process CPU time, so they are pairs
per second per core even when other jobs share the machine. The caption rules run compiled where
they were built; ``BM6B_PURE_PYTHON=1`` runs the pure-Python rules instead. ``--encoder FILE``
adds the cosine of a trained bilingual encoder to the translate-check.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

from bm6b.filters import captions, speedups
from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.lid import load_lid_model
from bm6b.filters.translate import TranslateChecker, default_index

DEFAULT_RAW = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"


def read_pairs(raw: pathlib.Path, limit: int) -> list[tuple[str, str]]:
    def read(name: str) -> dict[str, str]:
        captions_by_key = {}
        with open(raw / "flickr8k-cn" / name, encoding="utf-8") as f:
            for line in f:
                key, _, text = line.rstrip("\n").partition(" ")
                image, _, index = key.split("#")
                captions_by_key[f"{image}#{index}"] = text
        return captions_by_key

    english = read("flickr8kenc.caption.txt")
    chinese = read("flickr8kzhb.caption.txt")
    pairs = [(chinese[key], english[key]) for key in english if key in chinese]
    return pairs[:limit]


def run_fasttext(pairs, model) -> None:
    for zh, en in pairs:
        model.predict(zh, k=1)
        model.predict(en, k=1)


def run_bm6b(pairs, model, config, checker, batch: int = 256) -> None:
    for start in range(0, len(pairs), batch):
        records = []
        for zh, en in pairs[start : start + batch]:
            record = {"caption_zh": zh, "caption_en": en, "captions": []}
            record, failure = captions.normalize_record(record, config)
            if not failure:
                records.append(record)
        for record, failure in captions.assign_languages_batch(records, model, config):
            if failure or checker is None:
                continue
            captions.check_translation(record, checker)


def time_loops(loops: dict, repeats: int) -> dict[str, list[float]]:
    """Return the CPU seconds of this process per run of each loop.

    On a shared machine, wall time also counts other jobs. The loops take turns, so a change in
    the machine's load during the benchmark affects each of them alike.
    """
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, function in loops.items():
            started = time.process_time()
            function()
            seconds[name].append(time.process_time() - started)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=pathlib.Path, default=DEFAULT_RAW, help="folder with the real data sets")
    parser.add_argument("--pairs", type=int, default=20_000, help="number of caption pairs per loop")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop; the median is reported")
    parser.add_argument("--batch", type=int, default=256, help="records per language-ID batch (1: one record at a time)")
    parser.add_argument("--encoder", default=None, metavar="FILE",
                        help="add this encoder's cosine to the translate-check (a `bm6b train-text-encoder` file)")
    args = parser.parse_args(argv)

    pairs = read_pairs(args.raw, args.pairs)
    config = CaptionConfig()
    if args.encoder:
        # The README's example weight and center; any positive weight costs the same.
        config = config.replace(embedding_model=args.encoder, embedding_center=0.63,
                                weights={**config.weights, "embedding": 11.6})
    model = load_lid_model()

    started = time.perf_counter()
    default_index()
    checker = TranslateChecker(config)
    load_seconds = time.perf_counter() - started

    # One untimed pass warms the regex, OpenCC and hanzidentifier caches.
    run_bm6b(pairs[:500], model, config, checker)

    loops = {
        "fasttext": lambda: run_fasttext(pairs, model),
        "bm6b": lambda: run_bm6b(pairs, model, config, checker, args.batch),
        "bm6b_no_translate": lambda: run_bm6b(pairs, model, config, None, args.batch),
    }
    medians = {name: statistics.median(runs) for name, runs in time_loops(loops, args.repeats).items()}

    compiled = [name for name in speedups.COMPILED_MODULES if speedups.compiled(name) is not None]
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, 1 thread, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"compiled caption rules: {', '.join(compiled) or 'none (pure Python)'}; "
          f"translate-check encoder: {args.encoder or 'none'}")
    print(f"pairs: {len(pairs)} Flickr8k-CN enc/zhb, median of {args.repeats} runs, batches of {args.batch}; "
          f"CC-CEDICT load {load_seconds:.2f} s (once per worker)")
    print("| loop | pairs/s/core | ratio to fastText predict |")
    print("|---|---|---|")
    ceiling = len(pairs) / medians["fasttext"]
    for name, seconds in medians.items():
        rate = len(pairs) / seconds
        print(f"| {name} | {rate:,.0f} | {rate / ceiling:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Language-ID accuracy of bm6b's caption slotting (zh / en / other) on real caption sets.

Usage: python benchmarks/lid_accuracy.py [--raw ../shared/data/raw] [--errors 8]

Each set has one expected slot: COCO and Flickr8k English captions are ``en``; Flickr8k-CN human
captions (zhc), human translations (zhm) and machine translations (zhb, zhg) are ``zh``; Multi30K
German, French and Czech are ``other``. The script prints the share of captions assigned to each
slot, the accuracy, and a few errors per set, for the raw lid.176 top-1 label (min confidence 0.5)
and for ``bm6b.filters.lid.identify``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import sys

from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.lid import identify, load_lid_model
from bm6b.filters.text_normalize import normalize_caption

DEFAULT_RAW = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"


def read_sets(raw: pathlib.Path, coco_limit: int) -> dict[str, tuple[str, list[str]]]:
    sets: dict[str, tuple[str, list[str]]] = {}

    coco: list[str] = []
    with gzip.open(raw / "coco-val2014-en-captions" / "coco_val2014_en_captions.jsonl.gz", "rt") as f:
        for line in f:
            coco.extend(json.loads(line)["en_captions"])
            if len(coco) >= coco_limit:
                break
    sets["coco en"] = ("en", coco[:coco_limit])

    flickr = raw / "flickr8k-cn"
    for kind, name, slot in (
        ("enc", "flickr8kenc.caption.txt", "en"),
        ("zhc", "flickr8kzhc.caption.txt", "zh"),
        ("zhm", "flickr8kzhmtest.captions.txt", "zh"),
        ("zhb", "flickr8kzhb.caption.txt", "zh"),
        ("zhg", "flickr8kzhg.caption.txt", "zh"),
    ):
        lines = (flickr / name).read_text(encoding="utf-8").splitlines()
        sets[f"flickr8k {kind}"] = (slot, [line.partition(" ")[2] for line in lines])

    multi30k = raw / "multi30k-en-de-fr-cs"
    for language in ("de", "fr", "cs", "en"):
        texts: list[str] = []
        for split in ("test_2016_flickr", "val"):
            with gzip.open(multi30k / f"{split}.{language}.gz", "rt", encoding="utf-8") as f:
                texts.extend(line.rstrip("\n") for line in f)
        sets[f"multi30k {language}"] = ("en" if language == "en" else "other", texts)
    return sets


def raw_top1_slot(text: str, model, config: CaptionConfig) -> str:
    labels, probs = model.predict(text.replace("\n", " "), k=1)
    label, prob = labels[0][9:], float(probs[0])
    if label in config.zh_labels and prob >= 0.5:
        return "zh"
    if label == "en" and prob >= 0.5:
        return "en"
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=pathlib.Path, default=DEFAULT_RAW, help="folder with the real data sets")
    parser.add_argument("--coco-limit", type=int, default=50_000, help="number of COCO captions to read")
    parser.add_argument("--errors", type=int, default=6, help="errors printed per set")
    args = parser.parse_args(argv)

    config = CaptionConfig()
    model = load_lid_model()
    print("| set | n | expected | raw top-1 accuracy | bm6b accuracy | bm6b zh / en / other |")
    print("|---|---|---|---|---|---|")
    errors: dict[str, list[str]] = {}
    for name, (expected, texts) in read_sets(args.raw, args.coco_limit).items():
        counts: collections.Counter[str] = collections.Counter()
        raw_ok = 0
        for text in texts:
            text = normalize_caption(text)
            result = identify(text, config, model)
            slot = result.slot or "other"
            counts[slot] += 1
            raw_ok += raw_top1_slot(text, model, config) == expected
            if slot != expected and len(errors.setdefault(name, [])) < args.errors:
                errors[name].append(f"{text!r} -> {result.label} {result.score:.2f}")
        n = len(texts)
        shares = " / ".join(f"{counts[s] / n:.4f}" for s in ("zh", "en", "other"))
        print(f"| {name} | {n} | {expected} | {raw_ok / n:.4f} | {counts[expected] / n:.4f} | {shares} |")

    print()
    for name, examples in errors.items():
        print(f"errors in {name}:")
        for example in examples:
            print(f"  {example}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

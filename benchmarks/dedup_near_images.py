"""Near-duplicate image detection on real photos: precision and recall per transform and radius.

Each photo of a folder (default: the 1,000 Flickr8k photos of ../shared/data/raw, research use
only, read in place) gets seven transformed copies. All originals and copies are hashed with
the pipeline's pHash and clustered at each radius with the exact pigeonhole bands. A copy
counts as found when it lands in its original's cluster, and as correctly flagged (precision)
when its cluster contains other items, all of its own photo. A cluster containing two
different photos is a false merge. With ``--beam-radius`` the chosen radius also runs through the
``DedupNearImages`` Beam step, whose kept/rejected split must equal the in-memory clusters.
``--montage`` writes the false merges side by side as PNG files for checking by eye.

    python benchmarks/dedup_near_images.py --beam-radius 6 --montage /tmp/near_dup_false_merges
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from bm6b.dedup import phash as ph
from bm6b.filters.image import compute_phash

logger = logging.getLogger("dedup_near_images")

DEFAULT_FOLDER = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "raw" / "flickr8k-images" / "images"


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def _text(image: Image.Image) -> Image.Image:
    marked = image.copy()
    draw = ImageDraw.Draw(marked)
    draw.text((6, marked.height - 18), "© stock 2026", fill=(255, 255, 0))
    return marked


# Each transform is small: the copy shows the same photo to a person.
TRANSFORMS = {
    "resize_50pct": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "jpeg_q10": lambda im: _jpeg(im, 10),
    "crop_3pct_each_side": lambda im: _crop(im, 0.03),
    "brightness_130pct": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "grayscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "border_3pct_white": lambda im: ImageOps.expand(im, border=max(1, round(im.width * 0.03)), fill=(255, 255, 255)),
    "text_overlay": _text,
}


def build_items(folder: Path, limit: int | None):
    """Return (photo index, transform name or "original", pHash, image) for every original and copy."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))[:limit]
    items = []
    for photo, name in enumerate(names):
        with Image.open(folder / name) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        items.append((photo, "original", compute_phash(image), image))
        for transform, apply in TRANSFORMS.items():
            copy = apply(image)
            items.append((photo, transform, compute_phash(copy), copy))
    return names, items


def evaluate(items, radius: int) -> dict:
    codes = np.array([code for _, _, code, _ in items], dtype=np.uint64)
    labels = ph.pairs_to_components(len(codes), ph.candidate_pairs(codes, ph.pigeonhole_scheme(radius)))
    photos = np.array([photo for photo, _, _, _ in items])
    photos_in_cluster: dict[int, set] = collections.defaultdict(set)
    for label, photo in zip(labels.tolist(), photos.tolist()):
        photos_in_cluster[label].add(photo)
    original_label = {photo: labels[i] for i, (photo, kind, _, _) in enumerate(items) if kind == "original"}

    per_transform = {}
    for transform in TRANSFORMS:
        found = flagged = correct = 0
        indices = [i for i, (_, kind, _, _) in enumerate(items) if kind == transform]
        for i in indices:
            photo = items[i][0]
            cluster = photos_in_cluster[labels[i]]
            same = labels[i] == original_label[photo]
            found += same
            if same or int((labels == labels[i]).sum()) > 1:
                flagged += 1
                correct += cluster == {photo}
        per_transform[transform] = {
            "recall": round(found / len(indices), 4),
            "precision": round(correct / flagged, 4) if flagged else None,
            "found": int(found),
            "copies": len(indices),
        }
    false_merges = [sorted(p) for p in photos_in_cluster.values() if len(p) > 1]
    removed = len(items) - len(set(labels.tolist()))
    return {
        "radius": radius,
        "per_transform": per_transform,
        "false_merge_clusters": len(false_merges),
        "photos_in_false_merges": sum(len(c) for c in false_merges),
        "false_merges": false_merges,
        "removed": int(removed),
        "labels": labels,
    }


def closest_distinct_pairs(items, count: int = 10):
    """Return the closest pairs of different photos (originals only), for the report."""
    originals = [(photo, code) for photo, kind, code, _ in items if kind == "original"]
    codes = np.array([c for _, c in originals], dtype=np.uint64)
    distances = np.bitwise_count(codes[:, None] ^ codes[None, :])
    upper = np.triu_indices(len(codes), 1)
    order = np.argsort(distances[upper], kind="stable")[:count]
    return [(int(upper[0][k]), int(upper[1][k]), int(distances[upper][k])) for k in order]


def write_montage(items, names, clusters, radius: int, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, cluster in enumerate(clusters):
        originals = [next(im for p, kind, _, im in items if p == photo and kind == "original") for photo in cluster]
        thumbs = [im.resize((200, round(200 * im.height / im.width))) for im in originals]
        canvas = Image.new("RGB", (210 * len(thumbs), max(t.height for t in thumbs) + 20), "white")
        draw = ImageDraw.Draw(canvas)
        for k, (thumb, photo) in enumerate(zip(thumbs, cluster)):
            canvas.paste(thumb, (210 * k, 20))
            draw.text((210 * k + 2, 2), names[photo][:28], fill=(0, 0, 0))
        path = folder / f"r{radius}_merge{number:02d}.png"
        canvas.save(path)
        paths.append(str(path))
    return paths


def run_beam(items, radius: int) -> int:
    """Run DedupNearImages on the items; return the number rejected."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from bm6b.dedup import DedupNearImages

    records = [
        {"key": f"{i:016x}", "phash": code, "orig_width": im.width, "orig_height": im.height,
         "caption_en": "x", "url": f"item{i}", "uid": "u", "source": "bench", "source_row": i}
        for i, (_, _, code, im) in enumerate(items)
    ]
    with tempfile.TemporaryDirectory() as folder:
        count_path = os.path.join(folder, "rejected")

        def write_count(count: int) -> None:
            with open(count_path, "w") as handle:
                handle.write(str(count))

        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
            out = pipeline | beam.Create(records) | DedupNearImages(radius=radius)
            _ = out.rejects | "Count" >> beam.combiners.Count.Globally() | "Write" >> beam.Map(write_count)
        with open(count_path) as handle:
            return int(handle.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--limit", type=int, help="use only the first N photos")
    parser.add_argument("--radii", type=int, nargs="+", default=list(range(0, 13, 2)))
    parser.add_argument("--beam-radius", type=int, help="also run the Beam step at this radius")
    parser.add_argument("--montage", type=Path, help="write false-merge montages (PNG) to this folder")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.folder.is_dir():
        parser.error(f"photo folder {args.folder} not found")

    started = time.perf_counter()
    names, items = build_items(args.folder, args.limit)
    logger.info("%d photos, %d items hashed in %.1f s", len(names), len(items), time.perf_counter() - started)

    results = []
    for radius in args.radii:
        result = evaluate(items, radius)
        montage = write_montage(items, names, result["false_merges"], radius, args.montage) if args.montage else []
        result["montage"] = montage
        result["false_merges"] = [[names[p] for p in cluster] for cluster in result["false_merges"]]
        del result["labels"]
        results.append(result)
        recalls = " ".join(f"{t}={v['recall']:.3f}/{v['precision']}" for t, v in result["per_transform"].items())
        logger.info("r=%d false merges=%d removed=%d %s", radius, result["false_merge_clusters"], result["removed"], recalls)

    closest = [(names[a], names[b], d) for a, b, d in closest_distinct_pairs(items)]
    logger.info("closest distinct originals: %s", closest)
    summary = {"photos": len(names), "items": len(items), "results": results, "closest_distinct": closest}
    if args.beam_radius is not None:
        in_memory = evaluate(items, args.beam_radius)["removed"]
        rejected = run_beam(items, args.beam_radius)
        summary["beam"] = {"radius": args.beam_radius, "rejected": rejected, "in_memory_removed": in_memory}
        logger.info("Beam DedupNearImages at r=%d rejected %d (in memory: %d)", args.beam_radius, rejected, in_memory)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""A small writer of bm6b shards without Beam, and a synthetic bilingual shape dataset.

``write_shards`` writes the same layout as ``bm6b curate`` (``NNNNN.tar`` with ``KEY.jpg``,
``KEY.zh.txt``, ``KEY.en.txt`` and ``KEY.json`` members, plus ``NNNNN.parquet`` with the record
rows). It serves tests, demos and benchmarks that need shards from images already on disk.
``synthetic_pairs`` draws learnable image-caption pairs (coloured shapes with zh and en
captions) so the trainer can be tested in seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from bm6b.schemas import RECORD_SCHEMA, SCHEMA_VERSION, make_key, record_to_row


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def to_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_record(source: str, row: int, jpeg: bytes, caption_zh: str | None, caption_en: str | None) -> dict:
    """Build a record with the fields a trainer reads; the curation-only fields stay empty."""
    with Image.open(io.BytesIO(jpeg)) as image:
        width, height = image.size
    return {
        "key": make_key(source, row),
        "uid": hashlib.sha256(f"{source}\0{row}".encode()).hexdigest()[:32],
        "caption_zh": caption_zh,
        "caption_en": caption_en,
        "width": width,
        "height": height,
        "orig_width": width,
        "orig_height": height,
        "sha256": hashlib.sha256(jpeg).hexdigest(),
        "source": source,
        "source_row": row,
        "schema_version": SCHEMA_VERSION,
        "image": jpeg,
    }


def write_shards(records: Iterable[dict], output: str | Path, samples_per_shard: int = 1000) -> list[str]:
    """Write records (with an ``image`` field of JPEG bytes) as numbered shards; return the tar paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    batch: list[dict] = []

    def flush() -> None:
        name = f"{len(paths):05d}"
        for record in batch:
            record["shard"] = name
        tar_path = output / f"{name}.tar"
        with tarfile.open(f"{tar_path}.tmp", mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for record in batch:
                key = record["key"]
                _add_member(tar, f"{key}.jpg", record["image"])
                for lang in ("zh", "en"):
                    if record.get(f"caption_{lang}"):
                        _add_member(tar, f"{key}.{lang}.txt", record[f"caption_{lang}"].encode("utf-8"))
                row = json.dumps(record_to_row(record), ensure_ascii=False).encode("utf-8")
                _add_member(tar, f"{key}.json", row)
        table = pa.Table.from_pylist([record_to_row(r) for r in batch], schema=RECORD_SCHEMA)
        pq.write_table(table, output / f"{name}.parquet", compression="zstd")
        os.replace(f"{tar_path}.tmp", tar_path)
        paths.append(str(tar_path))
        batch.clear()

    for record in records:
        batch.append(record)
        if len(batch) == samples_per_shard:
            flush()
    if batch:
        flush()
    return paths


COLORS = [
    ("red", "红色", (220, 30, 30)),
    ("green", "绿色", (30, 170, 50)),
    ("blue", "蓝色", (30, 60, 220)),
    ("yellow", "黄色", (235, 215, 40)),
    ("purple", "紫色", (140, 40, 170)),
    ("white", "白色", (245, 245, 245)),
]
SHAPES = [("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形")]
BACKGROUNDS = [("black", "黑色", (15, 15, 15)), ("gray", "灰色", (128, 128, 128))]


def synthetic_pairs(count: int, seed: int, size: int = 64) -> Iterator[tuple[bytes, str, str]]:
    """Yield (jpeg, caption_zh, caption_en) for random shapes: 6 colours x 3 shapes x 2 backgrounds."""
    rng = random.Random(seed)
    for _ in range(count):
        color_en, color_zh, rgb = rng.choice(COLORS)
        shape_en, shape_zh = rng.choice(SHAPES)
        background_en, background_zh, background = rng.choice(BACKGROUNDS)
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        radius = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
        if shape_en == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=rgb)
        elif shape_en == "square":
            draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=rgb)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=rgb)
        caption_en = f"a {color_en} {shape_en} on a {background_en} background"
        caption_zh = f"{background_zh}背景上的一个{color_zh}{shape_zh}"
        yield to_jpeg(image), caption_zh, caption_en


def write_synthetic_shards(output: str | Path, count: int, seed: int = 0, samples_per_shard: int = 200) -> list[str]:
    """Write ``count`` synthetic shape pairs as shards; return the tar paths."""
    source = f"synthetic-{seed}"
    records = (
        make_record(source, row, jpeg, zh, en)
        for row, (jpeg, zh, en) in enumerate(synthetic_pairs(count, seed))
    )
    return write_shards(records, output, samples_per_shard)

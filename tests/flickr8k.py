"""Builds the real-data curate run shared by end-to-end tests: 1,000 Flickr8k photos from 127.0.0.1.

The photos and captions are research-use data read from ../shared/data/raw; nothing is copied
into the repository.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DUPLICATE_OF = "1000268201_693b08cb0e.jpg"


def read_captions(path: Path, tag: str) -> dict[str, str]:
    """Return image -> caption #0 from a Flickr8k-CN caption file (``IMG.jpg#tag#N caption``)."""
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            ident, _, caption = line.rstrip("\n").partition(" ")
            image, _, rest = ident.partition(f"#{tag}#")
            if rest == "0":
                captions[image] = caption
    return captions


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_flickr8k_manifests(raw: Path, folder: Path, base_url: str) -> dict:
    """Write the manifest as a Parquet file (first half) and a JSONL.gz file (second half).

    Returns the expected facts the tests check: rows, the injected dead links and duplicate, and
    the caption of every image.
    """
    import gzip

    images = sorted(p.name for p in (raw / "flickr8k-images" / "images").glob("*.jpg"))
    english = read_captions(raw / "flickr8k-cn" / "flickr8kenc.caption.txt", "enc")
    chinese = read_captions(raw / "flickr8k-cn" / "flickr8kzhc.caption.txt", "zhc")
    rows = [{"url": f"{base_url}/{name}", "caption_en": english.get(name), "caption_zh": chinese.get(name)} for name in images]

    dead = [
        {"url": f"{base_url}/missing_photo_1.jpg", "caption_en": "A dog runs on the grass .", "caption_zh": "一只狗在草地上奔跑。"},
        {"url": f"{base_url}/missing/photo_2.jpg", "caption_en": "Two men ride bikes .", "caption_zh": None},
        {"url": f"http://127.0.0.1:{closed_port()}/photo_3.jpg", "caption_en": "A boat on a lake .", "caption_zh": "湖上的一条船。"},
    ]
    duplicate = {"url": f"{base_url}/{DUPLICATE_OF}?mirror=1", "caption_en": "A girl enters a wooden house .", "caption_zh": None}
    rows = rows[:500] + dead + [duplicate] + rows[500:]

    folder.mkdir(parents=True, exist_ok=True)
    parquet_path = folder / "part-0.parquet"
    jsonl_path = folder / "part-1.jsonl.gz"
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), parquet_path)
    with gzip.open(jsonl_path, "wt", encoding="utf-8") as handle:
        for row in rows[half:]:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "paths": [str(parquet_path), str(jsonl_path)],
        "base_url": base_url,
        "rows": len(rows),
        "images": images,
        "english": english,
        "chinese": chinese,
        "dead_urls": [d["url"] for d in dead],
        "duplicate_url": duplicate["url"],
    }

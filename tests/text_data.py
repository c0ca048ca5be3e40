"""Readers for the real caption sets used by the caption-stage tests.

The data lives outside the repository in ``../shared/data/raw`` (research-use sets must not be
copied in). Every reader skips the calling test with the missing path when the folder is absent.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

RAW_DIR = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "raw").resolve()


def raw_path(*parts: str) -> Path:
    path = RAW_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path}; these tests need ../shared/data/raw next to the repository")
    return path


def laion_texts() -> list[str]:
    import pyarrow.parquet as pq

    path = raw_path("laion400m-sample-img2dataset", "laion400m_sample_5000.parquet")
    return pq.read_table(path, columns=["TEXT"]).column("TEXT").to_pylist()


def flickr8k_captions(kind: str) -> dict[str, str]:
    """Map ``IMAGE#N`` to the caption for kind enc, zhc, zhm, zhb or zhg."""
    names = {
        "enc": "flickr8kenc.caption.txt",
        "zhc": "flickr8kzhc.caption.txt",
        "zhm": "flickr8kzhmtest.captions.txt",
        "zhb": "flickr8kzhb.caption.txt",
        "zhg": "flickr8kzhg.caption.txt",
    }
    path = raw_path("flickr8k-cn", names[kind])
    captions = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, text = line.rstrip("\n").partition(" ")
            image, _, index = key.split("#")
            captions[f"{image}#{index}"] = text
    return captions


def flickr8k_split(name: str) -> list[str]:
    """Image file names (with .jpg) of the train, val or test split."""
    path = raw_path("flickr8k-cn", f"flickr8k{name}.txt")
    return [line.strip() + ".jpg" for line in path.read_text().splitlines() if line.strip()]


def coco_captions(limit: int | None = None) -> list[str]:
    path = raw_path("coco-val2014-en-captions", "coco_val2014_en_captions.jsonl.gz")
    captions: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            captions.extend(json.loads(line)["en_captions"])
            if limit is not None and len(captions) >= limit:
                return captions[:limit]
    return captions


def multi30k_captions(language: str, split: str = "test_2016_flickr") -> list[str]:
    path = raw_path("multi30k-en-de-fr-cs", f"{split}.{language}.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]

"""Evaluation sets for decontamination: their image pHashes and normalized caption keys.

An evaluation set is given as a path:

* a folder: every image file below it (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``,
  ``.gif``, ``.tif``, ``.tiff``) is an evaluation image, its id is ``NAME:relative/path``;
* a manifest (``.jsonl``, ``.csv``, ``.tsv``): one row per evaluation item with an optional
  ``id`` column, an optional ``image`` column (a local path, relative to the manifest's
  folder) and any number of caption columns (``caption``, ``caption_zh``, ``caption_en``,
  ``captions`` as a JSON list, or any column whose name starts with ``caption``).

``NAME`` is the folder or file name without its extension, or the part before ``=`` when the
path is given as ``NAME=PATH``. Everything is read once, on the machine that builds the
pipeline, and travels inside the decontamination step: an evaluation set of 50,000 images
costs 400 KB of pHashes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from bm6b.dedup.captions import exact_key
from bm6b.filters.image import ImageConfig, compute_phash

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_SUFFIXES = frozenset({".jsonl", ".csv", ".tsv"})

# Captions whose exact key is shorter than this are not matched: a one- or two-character key
# ("猫", "dog") equals countless unrelated training captions.
MIN_CAPTION_KEY_CHARS = 4
# Evaluation images with more pixels are skipped as decompression bombs (the curate default).
MAX_EVAL_PIXELS = ImageConfig.max_pixels


@dataclasses.dataclass
class EvalIndex:
    """The pHashes and caption keys of all evaluation sets, each with the id of its item."""

    phashes: list[int] = dataclasses.field(default_factory=list)
    image_ids: list[str] = dataclasses.field(default_factory=list)
    captions: dict[str, str] = dataclasses.field(default_factory=dict)  # exact key -> eval id
    skipped: int = 0

    def add_image(self, path: Path, item_id: str) -> None:
        try:
            with Image.open(path) as image:
                # Pillow's own bomb limit is a process global that a larger --max-pixels raises, so
                # evaluation images are held to the default limit here.
                width, height = image.size
                if width * height > MAX_EVAL_PIXELS:
                    raise Image.DecompressionBombError(f"{width}x{height} pixels > {MAX_EVAL_PIXELS}")
                image.load()
                phash = compute_phash(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            logger.warning("evaluation image %s skipped: %s", path, err)
            self.skipped += 1
            return
        self.phashes.append(phash)
        self.image_ids.append(item_id)

    def add_caption(self, text: str, item_id: str) -> None:
        key = exact_key(text)
        if len(key) >= MIN_CAPTION_KEY_CHARS:
            self.captions.setdefault(key, item_id)

    def __len__(self) -> int:
        return len(self.phashes) + len(self.captions)


def _split_name(spec: str) -> tuple[str, Path]:
    if "=" in spec and not os.path.exists(spec):
        name, _, path = spec.partition("=")
        return name, Path(path)
    path = Path(spec)
    return path.stem if path.is_file() else path.name, path


def _manifest_rows(path: Path) -> Iterator[dict]:
    try:
        yield from _decoded_manifest_rows(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"evaluation manifest {path} is not UTF-8 text ({err}); save it as UTF-8") from err


def _decoded_manifest_rows(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix == ".jsonl":
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"evaluation manifest {path} line {line_number} is not valid JSON: {err}") from err
                if not isinstance(row, dict):
                    raise ValueError(f"evaluation manifest {path} line {line_number} is not a JSON object")
                yield row
        else:
            yield from csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")


def _row_captions(row: dict) -> Iterator[str]:
    for column, value in row.items():
        if not str(column).lower().startswith("caption") or value in (None, ""):
            continue
        if isinstance(value, list):
            yield from (str(v) for v in value if v)
        elif isinstance(value, str) and column == "captions" and value.startswith("["):
            yield from (str(v) for v in json.loads(value) if v)
        else:
            yield str(value)


def load_eval_set(spec: str, index: EvalIndex | None = None) -> EvalIndex:
    """Add one evaluation set (folder or manifest, optionally ``NAME=PATH``) to ``index``."""
    index = EvalIndex() if index is None else index
    name, path = _split_name(spec)
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                index.add_image(file, f"{name}:{file.relative_to(path).as_posix()}")
        return index
    if not path.is_file():
        raise FileNotFoundError(f"evaluation set not found: {path}")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(
            f"unsupported evaluation set {path}: expected an image folder or a .jsonl, .csv or .tsv manifest"
        )
    for row_number, row in enumerate(_manifest_rows(path)):
        item_id = f"{name}:{row.get('id') or row.get('image') or row_number}"
        image = row.get("image")
        if image:
            index.add_image(path.parent / str(image), item_id)
        try:
            captions = list(_row_captions(row))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"evaluation manifest {path} row {row_number} (0-based): column captions is not a valid JSON list: {err}"
            ) from err
        for caption in captions:
            index.add_caption(caption, item_id)
    return index


def load_eval_sets(specs: list[str]) -> EvalIndex:
    index = EvalIndex()
    for spec in specs:
        before = (len(index.phashes), len(index.captions))
        load_eval_set(spec, index)
        logger.info(
            "evaluation set %s: %d images, %d caption keys",
            spec, len(index.phashes) - before[0], len(index.captions) - before[1],
        )
    return index

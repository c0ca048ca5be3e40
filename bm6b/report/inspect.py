"""``bm6b inspect SHARD``: print a few samples of one output shard, or render them as HTML.

SHARD is either file of a shard pair (``00000.tar`` or ``00000.parquet``); the other one is
found beside it. The text view needs only the Parquet file; the HTML view also reads the images
from the tar.
"""

from __future__ import annotations

import base64
import html
import io
import tarfile
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

TEXT_FIELDS = ("url", "caption_zh", "caption_en", "lid_zh", "lid_zh_score", "lid_en", "lid_en_score",
               "width", "height", "orig_width", "orig_height", "clip_score_zh", "clip_score_en", "source", "source_row")


def shard_paths(shard: str) -> tuple[str, str]:
    """Return (tar path, parquet path) for a path to either file of a shard."""
    for suffix in (".tar", ".parquet"):
        if shard.endswith(suffix):
            stem = shard[: -len(suffix)]
            return f"{stem}.tar", f"{stem}.parquet"
    raise ValueError(f"{shard}: expected a shard file ending in .tar or .parquet, e.g. out/00000.tar")


def read_rows(parquet_path: str, count: int, keys: list[str] | None = None) -> list[dict[str, Any]]:
    """Return the first ``count`` rows of a shard's Parquet file, or the rows with the given keys."""
    if not FileSystems.exists(parquet_path):
        raise FileNotFoundError(f"shard Parquet file not found: {parquet_path}")
    with FileSystems.open(parquet_path) as handle:
        rows = pq.read_table(handle).to_pylist()
    if keys:
        wanted = set(keys)
        found = [row for row in rows if row.get("key") in wanted]
        missing = wanted - {row["key"] for row in found}
        if missing:
            raise KeyError(f"key(s) not in {parquet_path}: {', '.join(sorted(missing))}")
        return found
    return rows[:count]


def read_images(tar_path: str, keys: set[str]) -> dict[str, bytes]:
    """Return the ``KEY.jpg`` member of each wanted key from a shard tar."""
    if not FileSystems.exists(tar_path):
        raise FileNotFoundError(f"shard tar not found: {tar_path}")
    images: dict[str, bytes] = {}
    with FileSystems.open(tar_path) as handle, tarfile.open(fileobj=io.BytesIO(handle.read())) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            if extension == "jpg" and key in keys:
                images[key] = tar.extractfile(member).read()
    return images


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Format rows as a block of ``field: value`` lines per sample."""
    blocks = []
    for row in rows:
        lines = [f"== {row.get('key')}  (shard {row.get('shard')})"]
        for field in TEXT_FIELDS:
            value = row.get(field)
            if value is None:
                continue
            if isinstance(value, float):
                value = f"{value:.4f}"
            lines.append(f"  {field:<14}{value}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_rows_html(rows: list[dict[str, Any]], images: dict[str, bytes], title: str) -> str:
    """Return a standalone HTML page: each sample's image (embedded) beside its fields."""
    cards = []
    for row in rows:
        image = images.get(row["key"])
        picture = ("<p>(no image in the tar)</p>" if image is None else
                   f"<img src=\"data:image/jpeg;base64,{base64.b64encode(image).decode()}\" alt=\"{row['key']}\">")
        fields = "".join(
            f"<tr><th>{field}</th><td>{html.escape(str(row[field]))}</td></tr>"
            for field in TEXT_FIELDS if row.get(field) is not None
        )
        cards.append(f"<div class=\"card\"><h2>{row['key']}</h2>{picture}<table>{fields}</table></div>")
    style = ("body{font-family:sans-serif;margin:1.5em} .card{display:inline-block;vertical-align:top;width:340px;"
             "margin:0 1em 1.5em 0} img{max-width:320px;max-height:320px} th{text-align:left;padding-right:.6em;"
             "font-weight:normal;color:#666} td{word-break:break-all} h2{font-size:1em;font-family:monospace}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(cards)}</body></html>")


def inspect_shard(shard: str, count: int = 5, keys: list[str] | None = None, html_path: str | None = None) -> str:
    """Return the text view of ``count`` samples; with ``html_path`` also write the HTML view there."""
    tar_path, parquet_path = shard_paths(shard)
    rows = read_rows(parquet_path, count, keys)
    if html_path:
        images = read_images(tar_path, {row["key"] for row in rows})
        with FileSystems.create(html_path) as handle:
            handle.write(render_rows_html(rows, images, f"bm6b shard {shard}").encode("utf-8"))
    return format_rows(rows)

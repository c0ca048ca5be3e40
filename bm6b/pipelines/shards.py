"""Writing one output shard: a WebDataset tar and the Parquet file with the same rows.

Both files are written under a temporary name and renamed when complete, so a reader that lists
the output folder never sees a partial shard. Paths go through Beam's ``FileSystems``, so the
same code writes to local disk or to ``gs://``.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bm6b.schemas import RECORD_SCHEMA, record_to_row

SHARD_DIGITS = 5
EMBEDDING_FIELDS = frozenset({"clip_image_embedding", "clip_text_embedding_zh", "clip_text_embedding_en"})


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def shard_for_key(key: str, num_shards: int) -> int:
    """Assign a key to a shard. Keys are uniform hashes, so shards come out close to equal in size."""
    return int(key[:8], 16) % num_shards


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0  # identical input gives byte-identical shards
    tar.addfile(info, io.BytesIO(payload))


def _write_atomically(path: str, payload: bytes) -> None:
    temp = f"{path}.tmp"
    with FileSystems.create(temp) as handle:
        handle.write(payload)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temp], [path])


def build_tar(records: list[dict[str, Any]]) -> bytes:
    """Return the tar bytes for records that already carry their ``shard`` and encoded ``image``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            key = record["key"]
            _tar_member(tar, f"{key}.{record.get('image_format') or 'jpg'}", record["image"])  # jpg or webp
            if record.get("caption_zh"):
                _tar_member(tar, f"{key}.zh.txt", record["caption_zh"].encode("utf-8"))
            if record.get("caption_en"):
                _tar_member(tar, f"{key}.en.txt", record["caption_en"].encode("utf-8"))
            # Embeddings (when kept) stay in the Parquet file only: as JSON they would add tens of KB per sample.
            row = {k: v for k, v in record_to_row(record).items() if k not in EMBEDDING_FIELDS}
            _tar_member(tar, f"{key}.json", json.dumps(row, ensure_ascii=False).encode("utf-8"))
    return buffer.getvalue()


def build_parquet(records: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist([record_to_row(r) for r in records], schema=RECORD_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_shard(output_dir: str, index: int, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write ``NNNNN.tar`` and ``NNNNN.parquet`` for the records, sorted by key; return a summary."""
    name = shard_name(index)
    ordered = sorted(records, key=lambda r: r["key"])
    for record in ordered:
        record["shard"] = name
    tar_path = FileSystems.join(output_dir, f"{name}.tar")
    parquet_path = FileSystems.join(output_dir, f"{name}.parquet")
    _write_atomically(parquet_path, build_parquet(ordered))
    _write_atomically(tar_path, build_tar(ordered))
    return {"shard": name, "samples": len(ordered), "tar": tar_path, "parquet": parquet_path}

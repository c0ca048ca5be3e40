"""Streaming readers for URL + caption manifests: Parquet, CSV/TSV and JSONL, gzip-compressed or not.

``iter_manifest`` yields one ``(row_index, fields_or_error)`` pair per data row without loading the
file whole; ``row_to_record`` turns the fields into a sample record or a reject. Files are opened
through Beam's ``FileSystems``, so ``gs://`` and other Beam file systems work the same as local paths.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import re
import urllib.parse
import zlib
from typing import Any, BinaryIO, Iterator

from bm6b.schemas import Reason, make_key, make_reject, make_uid, new_record

STAGE = "ingest"

# Column names tried, in order, when the user does not name one.
URL_COLUMNS = ("url", "URL", "image_url", "img_url")
CAPTION_ZH_COLUMNS = ("caption_zh", "zh", "text_zh")
CAPTION_EN_COLUMNS = ("caption_en", "en", "text_en")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "alt", "alt_text")

BATCH_ROWS = 4096  # Parquet rows per read batch: bounds memory while streaming

# csv's default limit is 128 KiB per field; a long caption is a caption-rule matter, not a parse error.
csv.field_size_limit(64 * 1024 * 1024)


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """The manifest columns of the URL and the captions; None means detect the column from the header."""

    url_col: str | None = None
    caption_zh_col: str | None = None
    caption_en_col: str | None = None
    caption_col: str | None = None  # a caption of unknown language, assigned by language ID

    def resolve(self, columns: list[str], source: str) -> "ColumnMap":
        """Return a map with every role filled from the header; raise ValueError for a missing column."""
        present = set(columns)
        for role in ("url_col", "caption_zh_col", "caption_en_col", "caption_col"):
            name = getattr(self, role)
            if name is not None and name not in present:
                raise ValueError(
                    f"{source}: column {name!r} (--{role.replace('_', '-')}) not found; columns are {sorted(present)}"
                )

        def first(candidates: tuple[str, ...]) -> str | None:
            return next((c for c in candidates if c in present), None)

        url_col = self.url_col or first(URL_COLUMNS)
        if url_col is None:
            raise ValueError(f"{source}: no URL column found among {sorted(present)}; name it with --url-col")
        explicit = self.caption_zh_col or self.caption_en_col or self.caption_col
        if explicit:
            return ColumnMap(url_col, self.caption_zh_col, self.caption_en_col, self.caption_col)
        zh_col, en_col = first(CAPTION_ZH_COLUMNS), first(CAPTION_EN_COLUMNS)
        caption_col = None if (zh_col or en_col) else first(CAPTION_COLUMNS)
        if not (zh_col or en_col or caption_col):
            raise ValueError(
                f"{source}: no caption column found among {sorted(present)}; "
                "name one with --caption-zh-col, --caption-en-col or --caption-col"
            )
        return ColumnMap(url_col, zh_col, en_col, caption_col)

    def resolve_lenient(self, fields: dict[str, Any], first: "ColumnMap") -> "ColumnMap":
        """Resolve the detected columns again for one JSON row, whose keys may differ from the first row's.

        Explicitly named columns stay as given. A detected role falls back to the first row's
        choice when this row has none of its candidates, and the cell then reads as empty.
        """
        if self.caption_zh_col or self.caption_en_col or self.caption_col:
            return first
        url_col = self.url_col or _first_present(URL_COLUMNS, fields) or first.url_col
        zh_col = _first_present(CAPTION_ZH_COLUMNS, fields) or first.caption_zh_col
        en_col = _first_present(CAPTION_EN_COLUMNS, fields) or first.caption_en_col
        caption_col = None if (zh_col or en_col) else (_first_present(CAPTION_COLUMNS, fields) or first.caption_col)
        return ColumnMap(url_col, zh_col, en_col, caption_col)


def _first_present(candidates: tuple[str, ...], present) -> str | None:
    return next((c for c in candidates if c in present), None)


def manifest_format(path: str) -> tuple[str, bool]:
    """Return (format, gzipped) from the file name: format is parquet, csv, tsv or jsonl."""
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for ext, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return fmt, gz
    raise ValueError(f"{path}: unknown manifest format; expected .parquet, .csv, .tsv or .jsonl (optionally .gz)")


def _open(path: str) -> BinaryIO:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    # Decompression happens below, where the format is known; ask Beam for the raw bytes.
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


class ManifestError(ValueError):
    """The manifest file cannot be read on from ``row`` (not gzip, truncated, corrupt Parquet, ...)."""

    def __init__(self, path: str, row: int, error: BaseException):
        super().__init__(f"{path}: unreadable from source_row {row} (0-based data row) on: {type(error).__name__}: {error}")
        self.path = path
        self.row = row


def iter_manifest(path: str, columns: ColumnMap) -> Iterator[tuple[int, dict[str, Any] | str, ColumnMap]]:
    """Yield ``(row, fields, resolved_columns)`` per data row; ``fields`` is an error string for a bad row.

    Raises ``ManifestError`` when the file itself stops being readable (a broken gzip stream, a
    truncated Parquet file); the rows before that point have been yielded.
    """
    import pyarrow as pa

    fmt, gz = manifest_format(path)
    row = 0
    try:
        with _open(path) as raw:
            stream: BinaryIO = gzip.GzipFile(fileobj=raw) if gz else raw
            if fmt == "parquet":
                rows = _iter_parquet(stream, path, columns)
            elif fmt in ("csv", "tsv"):
                rows = _iter_delimited(stream, path, columns, "\t" if fmt == "tsv" else ",")
            else:
                rows = _iter_jsonl(stream, path, columns)
            for item in rows:
                row = item[0] + 1
                yield item
    except (OSError, EOFError, zlib.error, csv.Error, pa.ArrowException) as err:
        raise ManifestError(path, row, err) from err


def _iter_parquet(stream: BinaryIO, path: str, columns: ColumnMap):
    import pyarrow.parquet as pq

    # ParquetFile needs a seekable file; a gzipped Parquet file is read into memory first.
    if not stream.seekable():
        stream = io.BytesIO(stream.read())
    parquet = pq.ParquetFile(stream)
    resolved = columns.resolve(parquet.schema_arrow.names, path)
    wanted = [c for c in (resolved.url_col, resolved.caption_zh_col, resolved.caption_en_col, resolved.caption_col) if c]
    row = 0
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(dict.fromkeys(wanted))):
        for fields in batch.to_pylist():
            yield row, fields, resolved
            row += 1


def _iter_delimited(stream: BinaryIO, path: str, columns: ColumnMap, delimiter: str):
    # utf-8-sig drops the byte-order mark that Excel and Windows tools put before the header.
    # surrogateescape keeps invalid bytes visible to _text, which rejects the row they are in.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    resolved = columns.resolve(header, path)
    for row, values in enumerate(reader):
        if len(values) != len(header):
            yield row, f"expected {len(header)} fields, found {len(values)}", resolved
            continue
        yield row, dict(zip(header, values)), resolved


def _iter_jsonl(stream: BinaryIO, path: str, columns: ColumnMap):
    resolved: ColumnMap | None = None
    row = 0
    for line in io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape"):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            if not isinstance(fields, dict):
                raise ValueError(f"a JSON {type(fields).__name__}, not an object")
        except ValueError as err:
            yield row, f"invalid JSON: {err}", resolved or columns
            row += 1
            continue
        if resolved is None:
            resolved = columns.resolve(list(fields), path)
        yield row, fields, columns.resolve_lenient(fields, resolved)
        row += 1


_SURROGATE = re.compile("[\ud800-\udfff]")


class CellError(ValueError):
    """A URL or caption cell that contains something other than text (a list, an object, bytes)."""


def _text(value: Any, column: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return None
    if isinstance(value, (dict, list, tuple, bytes, bytearray)):
        raise CellError(f"invalid cell: column {column!r} contains a {type(value).__name__}, expected text")
    text = str(value)
    # Surrogates come from bytes that are not UTF-8 (decoded with surrogateescape) or from JSON
    # escapes of half an emoji ("\ud83d"). Either way the text is damaged, and replacing the
    # characters would keep a corrupted caption without a trace.
    if _SURROGATE.search(text):
        raise CellError(f"invalid cell: column {column!r} is not valid UTF-8 text (invalid bytes or a lone surrogate)")
    return text if text.strip() else None


def row_to_record(source: str, row: int, fields: dict[str, Any] | str, columns: ColumnMap) -> tuple[str, dict[str, Any]]:
    """Return ``("record", sample)`` or ``("reject", reject_row)`` for one manifest row."""
    key = make_key(source, row)
    if isinstance(fields, str):
        reject = {"key": key, "source": source, "source_row": row, "input": None}
        return "reject", make_reject(reject, stage=STAGE, reason=Reason.BAD_ROW, detail=f"{source} source_row {row}: {fields}")

    input_row = json.dumps(fields, ensure_ascii=False, default=str).encode("utf-8", "replace").decode("utf-8")
    try:
        url, caption_zh, caption_en, caption = (
            _text(fields.get(column), column) if column else None
            for column in (columns.url_col, columns.caption_zh_col, columns.caption_en_col, columns.caption_col)
        )
    except CellError as err:
        reject = {"key": key, "source": source, "source_row": row, "input": input_row}
        return "reject", make_reject(reject, stage=STAGE, reason=Reason.BAD_ROW, detail=f"{source} source_row {row}: {err}")

    base = {"key": key, "source": source, "source_row": row, "url": url, "input": input_row}
    if url is None:
        return "reject", make_reject(base, stage=STAGE, reason=Reason.MISSING_URL, detail=f"{source} source_row {row}: empty URL")
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return "reject", make_reject(
            base, stage=STAGE, reason=Reason.INVALID_URL, detail=f"{source} source_row {row}: not an absolute http(s) URL"
        )

    record = new_record(
        key=key,
        uid=make_uid(url, [caption_zh, caption_en, caption]),
        url=url,
        source=source,
        source_row=row,
        caption_zh=caption_zh,
        caption_en=caption_en,
        captions=[caption] if caption else [],
    )
    record["input"] = input_row
    return "record", record


def check_manifest(path: str, columns: ColumnMap) -> ColumnMap:
    """Read only the header (or first row) of a manifest and resolve its columns.

    Raises ValueError with the file name for an unknown format or a missing column, so a
    configuration mistake stops the job before any worker starts.
    """
    for _, _, resolved in iter_manifest(path, columns):
        return resolved
    return columns

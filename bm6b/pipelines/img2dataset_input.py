"""Read img2dataset output folders (webdataset or parquet format) as curate input.

Users who already downloaded with img2dataset start at bm6b's decode step: each successful sample
becomes a record whose ``image`` contains the stored image bytes (decoded, checked, resized and hashed
again by the download stage, without fetching), and each failed download becomes a download
reject with the closest reason code, so ``--retry-failed`` can fetch it again later.

img2dataset (1.47) writes, per shard NNNNN: for ``output_format=webdataset`` a ``NNNNN.tar`` with
``KEY.jpg`` (or .png/.webp), ``KEY.txt`` and ``KEY.json`` for the successes plus ``NNNNN.parquet``
with the metadata of every row; for ``output_format=parquet`` one ``NNNNN.parquet`` whose rows
carry the image bytes in a ``jpg``/``png``/``webp`` column and the caption in ``txt``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tarfile
import zlib
from typing import Any, Iterator

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bm6b.filters.download_record import PREFETCHED
from bm6b.schemas import Reason, make_key, make_reject, make_uid, new_record

logger = logging.getLogger(__name__)

STAGE = "download"
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")
_SHARD = re.compile(r"^\d+\.(tar|parquet)$")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _match(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def is_img2dataset_folder(path: str) -> bool:
    """Return True for a folder holding img2dataset shards (``NNNNN_stats.json`` next to them)."""
    if path.endswith((".parquet", ".csv", ".tsv", ".jsonl", ".json", ".gz", ".tar")):
        return False
    base = path.rstrip("/")
    return bool(_match(f"{base}/*_stats.json")) and bool(_match(f"{base}/*.tar") or _match(f"{base}/*.parquet"))


def split_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Split command-line inputs into (manifest patterns, img2dataset shard files)."""
    manifests, shards = [], []
    for path in inputs:
        if not is_img2dataset_folder(path):
            manifests.append(path)
            continue
        base = path.rstrip("/")
        tars = [p for p in _match(f"{base}/*.tar") if _SHARD.match(p.rsplit("/", 1)[-1])]
        # A webdataset-format shard is read from its tar. Its parquet contains only metadata and is read with it.
        shards.extend(tars or [p for p in _match(f"{base}/*.parquet") if _SHARD.match(p.rsplit("/", 1)[-1])])
    return manifests, shards


def reason_from_error(message: str | None) -> str:
    """Map an img2dataset ``error_message`` to the closest bm6b reason code."""
    text = (message or "").lower()
    match = re.search(r"http error (\d{3})", text)
    if match:
        status = int(match.group(1))
        if status == 404:
            return Reason.HTTP_404.value
        if status == 429:
            return Reason.HTTP_429.value
        if status >= 500:
            return Reason.HTTP_5XX.value
        return Reason.HTTP_ERROR.value
    if "timed out" in text or "timeout" in text:
        return Reason.TIMEOUT.value
    if "name or service not known" in text or "nodename nor servname" in text or "temporary failure in name resolution" in text:
        return Reason.DNS.value
    if "connection reset" in text or "remote end closed" in text:
        return Reason.RESET.value
    if "connection refused" in text or "urlopen error" in text:
        return Reason.CONNECT.value
    if "opt" in text and "out" in text:
        return Reason.OPTED_OUT.value
    return Reason.DECODE_ERROR.value if "image" in text else Reason.HTTP_ERROR.value


def _text(value: Any) -> str | None:
    """Return a caption or URL value of KEY.json or the metadata Parquet as text that UTF-8 can encode.

    JSON "\\ud800" escapes decode to lone surrogates, which become U+FFFD. Numbers and other
    non-string values become their ``str``.
    """
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if text.isascii():
        return text
    return _SURROGATE_RE.sub("\ufffd", text)


def _record(shard: str, index: int, url: Any, caption: Any, image: bytes | None) -> dict[str, Any]:
    url, caption = _text(url), _text(caption)
    record = new_record(
        key=make_key(shard, index),
        uid=make_uid(url or "", [caption]),
        url=url,
        source=shard,
        source_row=index,
        captions=[caption] if caption and caption.strip() else [],
    )
    record["input"] = json.dumps({"url": url, "caption": caption}, ensure_ascii=False)
    if image is not None:
        # NOTE: these are img2dataset's re-encoded bytes, so the record's sha256 is not the original
        # download's, and an EXIF orientation its OpenCV decode ignored cannot be recovered here.
        record["image"] = image
        record[PREFETCHED] = True
    return record


def _failure(shard: str, index: int, row: dict[str, Any]) -> dict[str, Any]:
    record = _record(shard, index, row.get("url"), row.get("caption") or row.get("txt"), None)
    message = row.get("error_message") or row.get("status") or "failed in img2dataset"
    return make_reject(record, stage=STAGE, reason=reason_from_error(message), detail=f"img2dataset: {message}")


def _metadata(path: str, key: str, data: bytes | None) -> dict[str, Any]:
    """Parse a sample's KEY.json, or return {} for a missing or damaged file so that the sample keeps its image."""
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except ValueError as err:
        logger.warning("%s: ignoring the unreadable %s.json (%s)", path, key, err)
        return {}
    return meta if isinstance(meta, dict) else {}


@dataclasses.dataclass
class _TarCut:
    """The first unreadable point of a tar shard before its end-of-archive marker."""

    offset: int  # byte offset of the header of the member that could not be read whole
    size: int  # bytes in the file
    key: str | None  # that member's sample key, when its name could be read
    error: str


def _sample_key(name: str) -> str:
    return name.rsplit("/", 1)[-1].partition(".")[0]


def _file_size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def _read_block(path: str, offset: int) -> bytes:
    """Return up to one tar block (512 bytes) of ``path`` from ``offset``."""
    with FileSystems.open(path) as handle:
        handle.seek(offset)
        return handle.read(tarfile.BLOCKSIZE)


def _check_archive_end(path: str, offset: int) -> _TarCut | None:
    """Return the cut when the block at ``offset`` is not a complete end-of-archive block.

    tarfile (Python 3.11) in stream mode stops without an error at a partial or invalid header
    after the first member, so a shard cut inside a header would otherwise lose its remaining
    samples without a trace.
    """
    block = _read_block(path, offset)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    # The name field is the header's first 100 bytes, NUL-terminated unless it fills them all.
    name_field = block[:100]
    name = ""
    if b"\0" in name_field or len(name_field) == 100:
        name = name_field.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    error = "partial header" if len(block) < tarfile.BLOCKSIZE else "invalid header"
    return _TarCut(offset, _file_size(path), _sample_key(name) or None, error)


def _read_tar_samples(path: str) -> tuple[dict[str, dict[str, bytes]], _TarCut | None]:
    """Read the members of a tar shard by sample key, up to the first member that is cut or damaged."""
    samples: dict[str, dict[str, bytes]] = {}
    reading: tarfile.TarInfo | None = None
    tar: tarfile.TarFile | None = None
    try:
        with FileSystems.open(path) as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                reading = member
                data = tar.extractfile(member).read()
                reading = None
                name = member.name.rsplit("/", 1)[-1]
                key, _, extension = name.partition(".")
                samples.setdefault(key, {})[extension.lower()] = data
            # NOTE: offsets behind a compression layer are not file offsets, so only plain tars are
            # checked, and a compressed tar cut inside a header still ends without a warning.
            if getattr(tar.fileobj, "comptype", "tar") == "tar":
                return samples, _check_archive_end(path, tar.offset)
            return samples, None
    except (tarfile.TarError, EOFError, zlib.error) as err:
        if reading is not None:
            cut = _TarCut(reading.offset, _file_size(path), _sample_key(reading.name), str(err))
        else:
            # The error came while looking for the next header, whose name is unknown.
            cut = _TarCut(tar.offset if tar is not None else 0, _file_size(path), None, str(err))
        return samples, cut


def _metadata_rows(path: str) -> list[dict[str, Any]]:
    """Return the rows of the shard's metadata parquet (every sample, successful or not), or []."""
    metadata = path[: -len(".tar")] + ".parquet"
    if not FileSystems.exists(metadata):
        return []
    with FileSystems.open(metadata) as handle:
        return pq.read_table(handle).to_pylist()


def _truncated(shard: str, index: int, key: str, row: dict[str, Any], detail: str) -> dict[str, Any]:
    record = _record(shard, index, row.get("url"), row.get("caption") or row.get("txt"), None)
    return make_reject(record, stage=STAGE, reason=Reason.TRUNCATED_SHARD, detail=f"sample {key}: {detail}")


def iter_webdataset_shard(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("record", record) per stored sample and ("reject", row) per failed or lost row of the shard.

    A tar that is cut off or damaged keeps the samples read before the cut. The sample whose
    member was cut, and every sample that the metadata parquet lists as downloaded but the tar
    does not contain, become ``truncated_shard`` rejects.
    """
    samples, cut = _read_tar_samples(path)
    rows = _metadata_rows(path)
    rows_by_key = {row["key"]: row for row in rows if row.get("key") is not None}
    if cut is not None:
        complete = sum(1 for key in samples if key != cut.key)
        logger.warning(
            "%s: the tar shard is cut off or damaged at byte %d of %d (%s, sample key %s); keeping the %d samples read before it",
            path, cut.offset, cut.size, cut.error, cut.key or "unknown", complete,
        )

    index = 0
    emitted: set[str] = set()
    for key in sorted(samples):
        if cut is not None and key == cut.key:
            continue
        parts = samples[key]
        image = next((parts[c] for c in IMAGE_COLUMNS if c in parts), None)
        if image is None:
            continue
        meta = _metadata(path, key, parts.get("json"))
        row = rows_by_key.get(key, {})
        caption = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else meta.get("caption", row.get("caption"))
        yield "record", _record(path, index, meta.get("url", row.get("url")), caption, image)
        emitted.add(key)
        index += 1

    if cut is not None and cut.key is not None:
        detail = f"its tar member is cut off at byte {cut.offset} of {cut.size} ({cut.error})"
        yield "reject", _truncated(path, index, cut.key, rows_by_key.get(cut.key, {}), detail)
        emitted.add(cut.key)
        index += 1

    for row in rows:
        key = row.get("key")
        if key in emitted:
            continue
        if row.get("status") != "success":
            yield "reject", _failure(path, index, row)
        elif key is None:
            continue  # without a key the row cannot be matched to a tar member
        elif cut is not None:
            detail = f"listed as downloaded, but the tar ends or breaks before it at byte {cut.offset} of {cut.size}"
            yield "reject", _truncated(path, index, key, row, detail)
        else:
            yield "reject", _truncated(path, index, key, row, "listed as downloaded, but the tar does not contain its image")
        index += 1


def iter_parquet_shard(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        column = next((c for c in IMAGE_COLUMNS if c in parquet.schema_arrow.names), None)
        index = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                image = row.get(column) if column else None
                if row.get("status", "success") == "success" and image:
                    caption = row.get("txt") if row.get("txt") is not None else row.get("caption")
                    yield "record", _record(path, index, row.get("url"), caption, image)
                else:
                    yield "reject", _failure(path, index, row)
                index += 1


def iter_shard(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    return iter_webdataset_shard(path) if path.endswith(".tar") else iter_parquet_shard(path)


class _ReadShard(beam.DoFn):
    def process(self, path: str):
        for kind, value in iter_shard(path):
            if kind == "record":
                yield value
            else:
                yield beam.pvalue.TaggedOutput("rejects", value)


class ReadImg2Dataset(beam.PTransform):
    """Read img2dataset shards into records with prefetched images, and rejects for failed rows."""

    def __init__(self, shards: list[str]):
        super().__init__()
        self.shards = shards

    def expand(self, pbegin):
        results = (
            pbegin
            | "Shards" >> beam.Create(self.shards)
            | "ReadShard" >> beam.ParDo(_ReadShard()).with_outputs("rejects", main="records")
        )
        return results.records | "Spread" >> beam.Reshuffle(), results.rejects

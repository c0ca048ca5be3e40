"""The sample record every stage reads and writes, and the rejects row.

Inside a pipeline a sample is a plain ``dict`` keyed by the field names of ``RECORD_SCHEMA``,
plus the transient ``image`` field holding the encoded image bytes (written to the tar, never to
Parquet). Stages fill the fields they own and leave the others untouched, so one schema serves
ingest, download, captions, dedup, scoring and the shard writer.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from typing import Any

import pyarrow as pa

# Bump when a field is added, removed or changes meaning.
SCHEMA_VERSION = 1

RECORD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # WebDataset key: no dots, stable per input row
        pa.field("uid", pa.string(), nullable=False),  # 128-bit hex hash of normalized URL + captions
        pa.field("url", pa.string()),
        pa.field("caption_zh", pa.string()),
        pa.field("caption_en", pa.string()),
        pa.field("lid_zh", pa.string()),  # fastText lid.176 label of caption_zh (zh, yue, wuu, en, ...)
        pa.field("lid_zh_score", pa.float32()),
        pa.field("lid_en", pa.string()),
        pa.field("lid_en_score", pa.float32()),
        pa.field("lid_zh_mixed", pa.bool_()),  # the caption mixes languages (second label above the mixed threshold)
        pa.field("lid_en_mixed", pa.bool_()),
        pa.field("zh_script", pa.string()),  # simplified, traditional, both or mixed (hanzidentifier)
        pa.field("caption_zh_original", pa.string()),  # before traditional -> simplified conversion, when converted
        pa.field("caption_issues", pa.list_(pa.string())),  # captions dropped from a kept row, with the rule
        pa.field("translate_score", pa.float32()),  # combined translate-check score, when the check ran
        pa.field("width", pa.int32()),  # of the stored (resized) image
        pa.field("height", pa.int32()),
        pa.field("orig_width", pa.int32()),  # of the decoded original, after EXIF orientation
        pa.field("orig_height", pa.int32()),
        pa.field("sha256", pa.string()),  # hex digest of the original downloaded bytes
        pa.field("phash", pa.uint64()),  # 64-bit DCT perceptual hash, first bit most significant
        pa.field("clip_score_zh", pa.float32()),
        pa.field("clip_score_en", pa.float32()),
        pa.field("clip_model", pa.string()),  # model id; "zh=ID;en=ID" when the languages used different models
        # L2-normalized CLIP embeddings, only with --clip-keep-embeddings; null otherwise.
        pa.field("clip_image_embedding", pa.list_(pa.float16())),
        pa.field("clip_text_embedding_zh", pa.list_(pa.float16())),
        pa.field("clip_text_embedding_en", pa.list_(pa.float16())),
        pa.field("source", pa.string()),  # manifest path as given on the command line
        pa.field("source_row", pa.int64()),  # 0-based data row within that manifest
        pa.field("shard", pa.string()),  # output shard name, e.g. "00000"
        pa.field("schema_version", pa.int16()),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("uid", pa.string()),
        pa.field("url", pa.string()),
        pa.field("source", pa.string()),
        pa.field("source_row", pa.int64()),
        pa.field("input", pa.string()),  # the input row as JSON, so a reject can be re-run or inspected
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # a code from bm6b.schemas.reasons
        pa.field("detail", pa.string()),
        pa.field("schema_version", pa.int16()),
    ]
)

RECORD_FIELDS = tuple(RECORD_SCHEMA.names)

# Query parameters that only track the visitor; removing them makes equal images share one URL.
# utm_*: Google Analytics campaign tags; gclid, dclid: Google Ads; fbclid: Facebook; msclkid:
# Microsoft Ads; yclid: Yandex; igshid: Instagram share; mc_cid, mc_eid: Mailchimp; spm: Alibaba
# (Taobao, Tmall) page-position tracking. None of them selects different content.
TRACKING_PARAMS = frozenset(
    {
        "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "utm_id",
        "gclid", "dclid", "fbclid", "msclkid", "yclid", "igshid", "mc_cid", "mc_eid", "spm",
    }
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str) -> str:
    """Normalize a URL for hashing and dedup.

    Lower-cases the scheme and host, writes an internationalized host in its ASCII (punycode)
    form, drops the default port, the fragment and the tracking parameters in
    ``TRACKING_PARAMS``, and keeps the path and the other parameters in order.
    """
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    elif not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # not a valid IDN: keep the text, so distinct invalid hosts stay distinct
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host
    if parts.username:
        userinfo = parts.username + (f":{parts.password}" if parts.password else "")
        netloc = f"{userinfo}@{host}"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{port}"
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k.lower() not in TRACKING_PARAMS
        ]
    )
    return urllib.parse.urlunsplit((scheme, netloc, parts.path or "/", query, ""))


def make_key(source: str, row: int) -> str:
    """Return the WebDataset key of a manifest row: 16 hex digits, stable for the same input.

    The key hashes the manifest path as given and the row number, so it does not depend on the
    order of the inputs on the command line, and it contains no dots.
    """
    digest = hashlib.blake2b(f"{source}\0{row}".encode(), digest_size=8)
    return digest.hexdigest()


def make_uid(url: str, captions: list[str | None]) -> str:
    """Return a 128-bit hex hash of the normalized URL and the captions, in input order."""
    h = hashlib.sha256(normalize_url(url).encode())
    for caption in captions:
        h.update(b"\0")
        h.update((caption or "").encode())
    return h.hexdigest()[:32]


def new_record(
    *,
    key: str,
    uid: str,
    url: str,
    source: str,
    source_row: int,
    caption_zh: str | None = None,
    caption_en: str | None = None,
    captions: list[str] | None = None,
) -> dict[str, Any]:
    """Create a sample dict with every schema field present.

    ``captions`` contains captions whose language is still unknown (from ``--caption-col``); the
    language-ID stage moves each into its zh or en slot.
    """
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(
        key=key,
        uid=uid,
        url=url,
        caption_zh=caption_zh,
        caption_en=caption_en,
        source=source,
        source_row=source_row,
        schema_version=SCHEMA_VERSION,
    )
    record["captions"] = list(captions or [])
    record["image"] = None
    return record


def record_to_row(record: dict[str, Any]) -> dict[str, Any]:
    """Return only the schema fields of a sample, ready for Parquet or the ``KEY.json`` member."""
    return {name: record.get(name) for name in RECORD_FIELDS}


def make_reject(
    record_or_input: dict[str, Any],
    *,
    stage: str,
    reason: str,
    detail: str = "",
) -> dict[str, Any]:
    """Build a rejects row from a sample (or, at ingest, from the raw input row)."""
    src = record_or_input
    input_row = src.get("input")
    if input_row is None:
        input_row = {
            "url": src.get("url"),
            "caption_zh": src.get("caption_zh"),
            "caption_en": src.get("caption_en"),
            "captions": src.get("captions") or None,
        }
    return {
        "key": src.get("key"),
        "uid": src.get("uid"),
        "url": src.get("url"),
        "source": src.get("source"),
        "source_row": src.get("source_row"),
        "input": input_row if isinstance(input_row, str) else json.dumps(input_row, ensure_ascii=False, default=str),
        "stage": stage,
        "reason": str(reason.value if hasattr(reason, "value") else reason),
        "detail": detail,
        "schema_version": SCHEMA_VERSION,
    }

"""``--retry-failed PREVIOUS_OUTPUT``: re-run only the samples a previous run lost to retryable failures.

The previous run's ``rejects/*.parquet`` keep each rejected row's input as JSON together with its
source and row number. Rows whose reason is in ``RETRYABLE`` (DNS, connect, timeout, reset,
too_slow, 429, 5xx, host_failing, truncated_shard) become records again, with the same key and uid as before, and go
through the whole pipeline. Every other reject stays in the previous output only.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bm6b.pipelines import ingest
from bm6b.schemas import Reason, make_key, make_reject, make_uid, new_record
from bm6b.schemas.reasons import RETRYABLE

logger = logging.getLogger(__name__)


def reject_files(previous_output: str) -> list[str]:
    """Return the rejects files of a previous run; raise FileNotFoundError when it has none."""
    pattern = FileSystems.join(previous_output, "rejects", "*.parquet")
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not paths:
        raise FileNotFoundError(f"--retry-failed: no rejects found at {pattern}; pass the --output folder of an earlier run")
    return paths


def check_retry_output(previous_output: str, output: str) -> None:
    """Raise before any output is written when the retry run cannot start."""
    if os.path.abspath(previous_output.rstrip("/")) == os.path.abspath(output.rstrip("/")):
        raise ValueError(
            f"--retry-failed {previous_output} and --output {output} are the same folder; "
            "the new run would delete the rejects it reads. Choose another --output."
        )
    reject_files(previous_output)


def record_from_reject(row: dict[str, Any], columns: ingest.ColumnMap) -> tuple[str, dict[str, Any]]:
    """Rebuild the sample of a rejects row; returns ("record", record) or ("reject", reject_row)."""
    source, source_row = row.get("source") or "", row.get("source_row")
    try:
        fields = json.loads(row.get("input") or "null")
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        base = {"key": row.get("key"), "uid": row.get("uid"), "url": row.get("url"), "source": source,
                "source_row": source_row, "input": row.get("input")}
        return "reject", make_reject(base, stage="ingest", reason=Reason.BAD_ROW, detail="retry: rejects row has no input")

    if set(fields) <= {"url", "caption_zh", "caption_en", "captions", "caption"}:
        # The input of a record built inside the pipeline (img2dataset input, or a retry of one).
        captions = fields.get("captions") or ([fields["caption"]] if fields.get("caption") else [])
        record = new_record(
            key=row.get("key") or make_key(source, source_row or 0),
            uid=row.get("uid") or make_uid(fields.get("url") or "", [fields.get("caption_zh"), fields.get("caption_en"), *captions]),
            url=fields.get("url"),
            source=source,
            source_row=source_row,
            caption_zh=fields.get("caption_zh"),
            caption_en=fields.get("caption_en"),
            captions=captions,
        )
        record["input"] = row.get("input")
        return "record", record

    resolved = columns.resolve(list(fields), source)
    return ingest.row_to_record(source, source_row, fields, resolved)


def iter_retryable(path: str, columns: ingest.ColumnMap, reasons: frozenset[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    with FileSystems.open(path) as handle:
        table = pq.read_table(handle)
    for row in table.to_pylist():
        if row.get("reason") in reasons:
            yield record_from_reject(row, columns)


class _ReadRetryable(beam.DoFn):
    def __init__(self, columns: ingest.ColumnMap, reasons: frozenset[str]):
        self.columns = columns
        self.reasons = reasons

    def process(self, path: str):
        for kind, value in iter_retryable(path, self.columns, self.reasons):
            if kind == "record":
                yield value
            else:
                yield beam.pvalue.TaggedOutput("rejects", value)


class ReadRetryable(beam.PTransform):
    """Records to retry from a previous run's rejects, plus ingest rejects for rows that cannot be rebuilt."""

    def __init__(self, previous_output: str, columns: ingest.ColumnMap, reasons: frozenset[str] = RETRYABLE):
        super().__init__()
        self.paths = reject_files(previous_output)
        self.columns = columns
        self.reasons = reasons

    def expand(self, pbegin):
        results = (
            pbegin
            | "RejectFiles" >> beam.Create(self.paths)
            | "ReadRejects" >> beam.ParDo(_ReadRetryable(self.columns, self.reasons)).with_outputs("rejects", main="records")
        )
        return results.records | "Spread" >> beam.Reshuffle(), results.rejects

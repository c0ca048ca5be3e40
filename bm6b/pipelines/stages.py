"""Shared pieces of the curate stages, and the ingest, download and CLIP-score PTransforms.

Each transform takes a PCollection of records and returns a ``StageOutput`` with the records that
pass and the rejects it produced. The per-record work lives in ``bm6b.filters`` and
``bm6b.pipelines.ingest``; these classes only wire it into Beam and count it with ``Metrics``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from bm6b.filters.download import FetchConfig
from bm6b.filters.download_record import RecordDownloader, StreamingDownloads
from bm6b.filters.image import ImageConfig
from bm6b.pipelines import ingest
from bm6b.pipelines.img2dataset_input import ReadImg2Dataset
from bm6b.pipelines.retry_failed import ReadRetryable
from bm6b.schemas import Reason, make_key, make_reject

logger = logging.getLogger(__name__)

REJECTS = "rejects"
METRICS_NAMESPACE = "bm6b"


@dataclasses.dataclass
class StageOutput:
    records: beam.PCollection
    rejects: beam.PCollection


def _count(stage: str, what: str):
    return Metrics.counter(METRICS_NAMESPACE, f"{stage}.{what}")


class RejectingDoFn(beam.DoFn):
    """A DoFn whose subclasses call ``self.keep`` or ``self.reject``, both counted per stage."""

    stage = ""

    def setup(self):
        self._in = _count(self.stage, "in")
        self._out = _count(self.stage, "out")
        self._rejected: dict[str, Any] = {}

    def _reject(self, record: dict[str, Any], reason: str, detail: str):
        counter = self._rejected.get(reason)
        if counter is None:
            counter = self._rejected[reason] = _count(self.stage, f"reject.{reason}")
        counter.inc()
        return pvalue.TaggedOutput(REJECTS, make_reject(record, stage=self.stage, reason=reason, detail=detail))


def split_rejects(pcoll: beam.PCollection, label: str, dofn: beam.DoFn) -> StageOutput:
    results = pcoll | label >> beam.ParDo(dofn).with_outputs(REJECTS, main="records")
    return StageOutput(results.records, results[REJECTS])


# ---------------------------------------------------------------- ingest


class _ReadManifest(RejectingDoFn):
    stage = ingest.STAGE

    def __init__(self, columns: ingest.ColumnMap):
        self.columns = columns

    def process(self, path: str):
        try:
            for row, fields, resolved in ingest.iter_manifest(path, self.columns):
                self._in.inc()
                kind, value = ingest.row_to_record(path, row, fields, resolved)
                if kind == "record":
                    self._out.inc()
                    yield value
                else:
                    yield self._reject(value, value["reason"], value["detail"])
        except ingest.ManifestError as err:
            # The rest of the file cannot be read, so its rows cannot be counted one by one. One
            # reject at the first unreadable row records where the file broke.
            self._in.inc()
            broken = {"key": make_key(path, err.row), "source": path, "source_row": err.row, "input": None}
            logger.error("%s", err)
            yield self._reject(broken, Reason.BAD_ROW.value, str(err))


class ReadManifests(beam.PTransform):
    """Stream every manifest file into sample records; bad rows become ingest rejects."""

    def __init__(self, paths: list[str], columns: ingest.ColumnMap):
        super().__init__()
        self.paths = paths
        self.columns = columns

    def expand(self, pbegin):
        out = split_rejects(pbegin | "ManifestPaths" >> beam.Create(self.paths), "ReadRows", _ReadManifest(self.columns))
        # Rows of one file come out of one worker; spread them before the expensive stages.
        return StageOutput(out.records | "Spread" >> beam.Reshuffle(), out.rejects)


# ---------------------------------------------------------------- download


class _Download(RejectingDoFn):
    """Downloads on a thread pool that stays busy across the whole bundle.

    Records are submitted as they arrive and emitted as they finish; the rest are emitted in
    ``finish_bundle``. A slow URL therefore occupies one thread, not a batch of records.
    """

    stage = "download"

    def __init__(self, fetch: FetchConfig, image: ImageConfig, threads: int):
        self.fetch_config = fetch
        self.image_config = image
        self.threads = threads

    def setup(self):
        super().setup()
        self.downloads = StreamingDownloads(RecordDownloader(self.fetch_config, self.image_config), self.threads)

    def teardown(self):
        self.downloads.close()

    def _emit(self, outcomes, windowed: bool):
        for record, reason, detail in outcomes:
            if reason is None:
                self._out.inc()
                output = record
            else:
                output = self._reject(record, reason, detail)
            if windowed:
                if isinstance(output, pvalue.TaggedOutput):
                    output = pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
                else:
                    output = GlobalWindows.windowed_value(output)
            yield output

    def process(self, record: dict[str, Any]):
        self._in.inc()
        yield from self._emit(self.downloads.submit(record), windowed=False)

    def finish_bundle(self):
        yield from self._emit(self.downloads.drain(), windowed=True)


class Download(beam.PTransform):
    """Fetch, decode, resize and hash each image over a per-worker thread pool."""

    def __init__(self, fetch: FetchConfig, image: ImageConfig, threads: int = 16, batch_size: int = 64):
        super().__init__()
        self.dofn = _Download(fetch, image, threads)
        self.batch_size = batch_size  # unused since downloads stream per record; kept for callers

    def expand(self, records):
        return split_rejects(records, "FetchAndDecode", self.dofn)


def with_other_inputs(pipeline, read: StageOutput, img2dataset_shards: list[str], retry_from: str | None,
                      columns: ingest.ColumnMap) -> StageOutput:
    """Add records from img2dataset shards and from a previous run's retryable rejects to ``read``."""
    records, rejects = [read.records], [read.rejects]
    if img2dataset_shards:
        shard_records, shard_rejects = pipeline | "ReadImg2Dataset" >> ReadImg2Dataset(img2dataset_shards)
        records.append(shard_records)
        rejects.append(shard_rejects)
    if retry_from:
        retry_records, retry_rejects = pipeline | "RetryFailed" >> ReadRetryable(retry_from, columns)
        records.append(retry_records)
        rejects.append(retry_rejects)
    if len(records) == 1:
        return read
    return StageOutput(records | "AllInputRecords" >> beam.Flatten(), rejects | "AllInputRejects" >> beam.Flatten())


# ---------------------------------------------------------------- CLIP score


class ClipScore(beam.PTransform):
    """Score each caption against its image through ``RunInference``, then apply the CLIP thresholds.

    ``config`` is a ``bm6b.pipelines.clip_inference.ClipStageConfig``; the work lives in that
    module. Returns ``StageOutput(records, rejects)``.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config

    def expand(self, records):
        from bm6b.pipelines.clip_inference import ClipScoreAndFilter

        return records | "ScoreAndFilter" >> ClipScoreAndFilter(self.config)

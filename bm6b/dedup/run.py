"""The ``dedup`` job: existing shards in, deduplicated shards, rejects and stats out."""

from __future__ import annotations

import logging
import time
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bm6b.dedup.config import DedupConfig
from bm6b.dedup.transforms import STAGE_IMAGE, STAGE_URL, DedupExactImages, DedupUrls, apply_dedup_steps, dedup_steps
from bm6b.pipelines.img2dataset_input import _read_tar_samples as read_tar_samples
from bm6b.pipelines.stats import compute_stats, write_stats
from bm6b.schemas import REJECT_SCHEMA, Reason, make_reject

logger = logging.getLogger(__name__)


def list_shards(folder: str) -> list[str]:
    """Return the Parquet paths of the shards in ``folder``; raise FileNotFoundError when there are none."""
    pattern = FileSystems.join(folder, "[0-9]*.parquet")
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not paths:
        raise FileNotFoundError(f"no shards (NNNNN.parquet + NNNNN.tar) found in {folder}")
    return paths


# Columns the dedup steps compare. A shard without one would crash a step or skip it silently.
REQUIRED_COLUMNS = ("key", "url", "sha256", "phash", "caption_zh", "caption_en")


def check_shards(parquet_paths: list[str]) -> None:
    """Raise FileNotFoundError or ValueError naming the first shard without its tar, a readable schema or ``REQUIRED_COLUMNS``.

    The tars themselves are not read here: ``read_shard`` rejects the rows whose images a damaged tar lost.
    """
    for path in parquet_paths:
        tar_path = path[: -len(".parquet")] + ".tar"
        if not FileSystems.exists(tar_path):
            raise FileNotFoundError(f"shard image file {tar_path} not found; each NNNNN.parquet needs its NNNNN.tar")
        try:
            with FileSystems.open(path) as handle:
                schema = pq.read_schema(handle)
        except (OSError, pa.ArrowException) as err:
            raise ValueError(f"shard {path} is not a readable Parquet file: {err}") from err
        missing = [column for column in REQUIRED_COLUMNS if column not in schema.names]
        if missing:
            noun = "column" if len(missing) == 1 else "columns"
            raise ValueError(
                f"shard {path} is missing {noun} {', '.join(missing)}; "
                "dedup reads shards written by bm6b curate or bm6b dedup"
            )
        phash_type = schema.field("phash").type
        if phash_type not in (pa.uint64(), pa.int64()):
            raise ValueError(f"shard {path} has phash of type {phash_type}; expected uint64 (or int64 with the same 64 bits)")


# Reading the input shards is the first stage of dedup, as reading the manifest is for curate.
STAGE_READ = "ingest"
# Image members that bm6b curate writes, one per sample: KEY.jpg or KEY.webp (--encode-format).
IMAGE_EXTENSIONS = ("jpg", "webp")


def read_shard(parquet_path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the records and rejects of one shard: its Parquet rows joined with their images from the tar.

    A tar that is cut off or damaged keeps the images read before the damage. Each row whose
    image is not in the readable part of the tar, or not in the tar at all, becomes a
    ``truncated_shard`` reject, so every row ends in the output or in the rejects table.
    """
    try:
        with FileSystems.open(parquet_path) as handle:
            rows = pq.read_table(handle).to_pylist()
    except (OSError, pa.ArrowException) as err:
        # check_shards read the schema, so the damage is in the data pages. Their rows cannot be
        # listed as rejects without their keys, so the job stops and names the file.
        raise ValueError(f"shard {parquet_path} has a readable schema but its rows cannot be read ({err}); "
                         "restore the shard from its source, or move it and its .tar out of the input folder") from err
    tar_path = parquet_path[: -len(".parquet")] + ".tar"
    samples, cut = read_tar_samples(tar_path)

    records, rejects = [], []
    for row in rows:
        if row["phash"] is not None and row["phash"] < 0:
            # An int64 column stores the upper half of the 64-bit codes as negative numbers.
            row["phash"] += 1 << 64
        parts = samples.get(row["key"], {})
        extension = next((extension for extension in IMAGE_EXTENSIONS if extension in parts), None)
        if extension is not None:
            records.append({**row, "image": parts[extension], "image_format": extension, "captions": []})
            continue
        if cut is not None and row["key"] == cut.key:
            detail = f"its tar member in {tar_path} is cut off at byte {cut.offset} of {cut.size} ({cut.error})"
        elif cut is not None:
            detail = f"{tar_path} is cut off or damaged at byte {cut.offset} of {cut.size} ({cut.error}) before its image"
        else:
            detail = f"{tar_path} does not contain its image, which {parquet_path} lists"
        rejects.append(make_reject(row, stage=STAGE_READ, reason=Reason.TRUNCATED_SHARD, detail=detail))

    if cut is not None:
        logger.warning(
            "%s is cut off or damaged at byte %d of %d (%s, sample key %s); %d of %d rows kept, the rest rejected as %s",
            tar_path, cut.offset, cut.size, cut.error, cut.key or "unknown", len(records), len(rows),
            Reason.TRUNCATED_SHARD.value,
        )
    elif rejects:
        logger.warning("%s lacks the images of %d of the %d rows in %s; they are rejected as %s",
                       tar_path, len(rejects), len(rows), parquet_path, Reason.TRUNCATED_SHARD.value)
    return records, rejects


class _ReadShard(beam.DoFn):
    def process(self, parquet_path: str):
        records, rejects = read_shard(parquet_path)
        yield from records
        for reject in rejects:
            yield beam.pvalue.TaggedOutput("rejects", reject)


def build_dedup_pipeline(pipeline: beam.Pipeline, shard_paths: list[str], output: str, config: DedupConfig,
                         samples_per_shard: int) -> list[str]:
    """Add reading, the dedup steps and writing to ``pipeline``; return the stage names in order."""
    from bm6b.pipelines.curate import WriteShards

    read = (
        pipeline
        | "ShardPaths" >> beam.Create(shard_paths)
        | "ReadShards" >> beam.ParDo(_ReadShard()).with_outputs("rejects", main="records")
    )
    records = read.records | "Spread" >> beam.Reshuffle()
    stages = [STAGE_READ]
    rejects = [read.rejects]
    if config.urls:
        out = records | "DedupUrl" >> DedupUrls()
        records = out.records
        rejects.append(out.rejects)
        stages.append(STAGE_URL)
    out = records | "DedupImage" >> DedupExactImages()
    records = out.records
    rejects.append(out.rejects)
    stages.append(STAGE_IMAGE)

    records, step_rejects = apply_dedup_steps(records, config)
    rejects.extend(step_rejects)
    stages.extend(dedup_steps(config))

    _ = records | "WriteShards" >> WriteShards(output, samples_per_shard)
    _ = (
        rejects
        | "AllRejects" >> beam.Flatten()
        | "WriteRejects"
        >> beam.io.WriteToParquet(
            FileSystems.join(output, "rejects", "rejects"),
            schema=REJECT_SCHEMA,
            codec="zstd",
            file_name_suffix=".parquet",
        )
    )
    return stages + ["write"]


def unconverged_nodes(result) -> int:
    """Return the ``components.unconverged`` counter of a finished pipeline (image and caption components)."""
    from apache_beam.metrics.metric import MetricsFilter

    counters = result.metrics().query(MetricsFilter().with_namespace("bm6b").with_name("components.unconverged"))
    return sum(counter.committed or 0 for counter in counters["counters"])


def run_dedup(input_folder: str, output: str, config: DedupConfig | None = None, beam_args: list[str] | None = None,
              samples_per_shard: int = 10_000, overwrite: bool = False) -> dict[str, Any]:
    """Run the dedup job on the shards in ``input_folder``; return the stats also written to ``output``."""
    from bm6b.pipelines.curate import pipeline_options, prepare_output

    config = config or DedupConfig()
    if FileSystems.join(input_folder, "") == FileSystems.join(output, ""):
        raise ValueError(f"--output {output} is the input folder; choose a new folder for the deduplicated shards")
    shard_paths = list_shards(input_folder)
    check_shards(shard_paths)
    prepare_output(output, overwrite)

    started = time.monotonic()
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    stages = build_dedup_pipeline(pipeline, shard_paths, output, config, samples_per_shard)
    logger.info("dedup: %d shard(s) from %s -> %s", len(shard_paths), input_folder, output)
    result = pipeline.run()
    result.wait_until_finish()
    elapsed = time.monotonic() - started
    unconverged = unconverged_nodes(result)
    if unconverged:
        logger.warning(
            "dedup: connected components did not converge for %d node(s), so some duplicate clusters stay split "
            "and keep extra samples; raise --components-rounds (now %d)", unconverged, config.components_rounds,
        )

    stats = compute_stats(output, stages=stages)
    stats["elapsed_s"] = round(elapsed, 3)
    stats["dedup"] = {"radius": config.radius, "candidates": config.candidates,
                      "sampled_bits": config.sampled_bits, "captions": config.captions,
                      "eval_sets": list(config.eval_sets), "unconverged_nodes": unconverged}
    write_stats(output, stats)
    return stats


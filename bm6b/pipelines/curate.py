"""The ``curate`` job: manifests in, WebDataset + Parquet shards, rejects and stats out.

    ReadManifests -> DedupUrls -> Download -> NormalizeCaptions -> LanguageId
        -> CaptionFrequency -> TranslateCheck (opt-in) -> DedupExactImages
        -> Decontaminate (with eval sets) -> DedupNearImages -> DedupCaptions
        -> ClipScore (when a model is set) -> WriteShards
    every stage's rejects -> rejects/*.parquet

``run_curate`` builds and runs the pipeline on any Beam runner; with no ``--runner`` it uses the
in-process ``FnApiRunner`` (Beam's DirectRunner would first try to download the Prism runner).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from bm6b.dedup import DedupConfig
from bm6b.dedup import run as dedup_run
from bm6b.dedup.transforms import DedupExactImages, DedupUrls, apply_dedup_steps, dedup_steps
from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.download import FetchConfig
from bm6b.filters.image import ImageConfig
from bm6b.pipelines import ingest, progress, stages
from bm6b.pipelines.caption_stages import apply_caption_stages, caption_stages_run
from bm6b.pipelines.clip_inference import stage_config_from_curate
from bm6b.pipelines.img2dataset_input import split_inputs as split_img2dataset_inputs
from bm6b.pipelines.retry_failed import check_retry_output
from bm6b.pipelines.shards import shard_for_key, write_shard
from bm6b.pipelines.stats import STAGE_ORDER, compute_stats, write_stats
from bm6b.schemas import REJECT_SCHEMA

logger = logging.getLogger(__name__)

DEFAULT_RUNNER = "FnApiRunner"


@dataclasses.dataclass
class CurateConfig:
    """Everything the curate job needs besides the Beam options; the CLI flags map onto these fields."""

    inputs: list[str]
    output: str
    columns: ingest.ColumnMap = dataclasses.field(default_factory=ingest.ColumnMap)
    fetch: FetchConfig = dataclasses.field(default_factory=FetchConfig)
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    download_threads: int = 16
    clip_model: str | None = None  # an open_clip config name; scoring is off unless a model or checkpoint is set
    clip_checkpoint: str | None = None  # file, folder or open_clip pretrained tag; None: seeded random init
    clip_model_zh: str | None = None  # a model for one language only, replacing clip_model there
    clip_checkpoint_zh: str | None = None
    clip_model_en: str | None = None
    clip_checkpoint_en: str | None = None
    clip_device: str = "cpu"
    clip_precision: str = "fp32"  # fp32, or fp16 / bf16 on CUDA
    clip_batch_size: int = 64  # maximum RunInference batch
    clip_min_batch_size: int = 1
    clip_min_score: float | None = None  # absolute cosine threshold for every scored language
    clip_min_score_zh: float | None = None
    clip_min_score_en: float | None = None
    clip_top_fraction: float | None = None  # keep this top fraction of each language's scores in the run
    clip_top_fraction_zh: float | None = None
    clip_top_fraction_en: float | None = None
    clip_keep_embeddings: bool = False  # float16 image and text embeddings in the Parquet output
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    samples_per_shard: int = 10_000
    overwrite: bool = False
    img2dataset_inputs: list[str] = dataclasses.field(default_factory=list)  # shard files of img2dataset output folders
    retry_failed: str | None = None  # a previous run's output folder: re-run its retryable rejects


def build_pipeline(pipeline: beam.Pipeline, config: CurateConfig) -> None:
    """Add the curate stages to ``pipeline``; the caller runs it."""
    read = pipeline | "Ingest" >> stages.ReadManifests(config.inputs, config.columns)
    read = stages.with_other_inputs(pipeline, read, config.img2dataset_inputs, config.retry_failed, config.columns)
    ingested, url_rejects = read.records, []
    if config.dedup.urls:
        by_url = ingested | "DedupUrl" >> DedupUrls()
        ingested, url_rejects = by_url.records, [by_url.rejects]
    downloaded = ingested | "Download" >> stages.Download(config.fetch, config.image, config.download_threads)
    captioned, caption_rejects = apply_caption_stages(downloaded.records, config.captions)
    unique = captioned | "DedupImage" >> DedupExactImages()
    records, dedup_rejects = apply_dedup_steps(unique.records, config.dedup)
    stage_rejects = [read.rejects, *url_rejects, downloaded.rejects, *caption_rejects,
                     unique.rejects, *dedup_rejects]
    clip_config = stage_config_from_curate(config, check_models=runs_locally(pipeline.options))
    if clip_config is not None:
        scored = records | "ClipScore" >> stages.ClipScore(clip_config)
        records = scored.records
        stage_rejects.append(scored.rejects)

    _ = records | "WriteShards" >> WriteShards(config.output, config.samples_per_shard)

    _ = (
        stage_rejects
        | "AllRejects" >> beam.Flatten()
        | "WriteRejects"
        >> beam.io.WriteToParquet(
            FileSystems.join(config.output, "rejects", "rejects"),
            schema=REJECT_SCHEMA,
            codec="zstd",
            file_name_suffix=".parquet",
        )
    )


class WriteShards(beam.PTransform):
    """Group records into shards of about ``samples_per_shard`` and write each tar + Parquet pair."""

    def __init__(self, output: str, samples_per_shard: int):
        super().__init__()
        self.output = output
        self.samples_per_shard = samples_per_shard

    def expand(self, records):
        total = records | "Count" >> beam.combiners.Count.Globally()
        per_shard = self.samples_per_shard

        def assign(record, count):
            num_shards = max(1, math.ceil(count / per_shard))
            return shard_for_key(record["key"], num_shards), record

        output = self.output
        return (
            records
            | "AssignShard" >> beam.Map(assign, count=beam.pvalue.AsSingleton(total))
            | "GroupShard" >> beam.GroupByKey()
            | "Write" >> beam.MapTuple(lambda index, members: write_shard(output, index, members))
        )


def prepare_output(output: str, overwrite: bool) -> None:
    """Create the output folder; raise FileExistsError if it already contains curate output, unless ``overwrite``."""
    existing = [
        m.path
        for pattern in ("*.tar", "*.parquet", "stats.json", "rejects/*")
        for result in FileSystems.match([FileSystems.join(output, pattern)])
        for m in result.metadata_list
    ]
    if existing and not overwrite:
        raise FileExistsError(
            f"{output} already contains curate output ({len(existing)} files, e.g. {existing[0]}); "
            "choose another --output or pass --overwrite"
        )
    if os.path.isfile(output):
        raise FileExistsError(f"--output {output} is a file; give a folder")
    if existing:
        FileSystems.delete(existing)
    if not FileSystems.exists(output):
        FileSystems.mkdirs(output)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs; raise FileNotFoundError naming any pattern that matches nothing."""
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        if not matched:
            raise FileNotFoundError(f"input manifest not found: {pattern}")
        paths.extend(matched)
    unique = list(dict.fromkeys(paths))
    if len(unique) < len(paths):
        # Keys hash the path and the row number, so reading a file twice would repeat its keys.
        logger.warning("ignoring %d input path(s) given more than once", len(paths) - len(unique))
    return unique


# Runners that execute the pipeline on this machine, where model files and devices can be checked.
LOCAL_RUNNERS = frozenset({"FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "PrismRunner"})


def runs_locally(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return name is None or name.split(".")[-1] in LOCAL_RUNNERS


def pipeline_options(beam_args: list[str] | None) -> PipelineOptions:
    """Build the Beam options; raise ValueError naming any argument that neither bm6b nor Beam defines.

    Beam itself only logs a warning for an unknown flag, so a typo such as ``--min-image-sise``
    would otherwise run the job without the intended filter.
    """
    options = PipelineOptions(beam_args or [])
    with_unknown = options.get_all_options(retain_unknown_options=True)
    unknown = sorted(set(with_unknown) - set(options.get_all_options()))
    if unknown:
        # Beam reports option names with underscores; echo the flags as the user spelled them.
        spelled = {}
        for arg in beam_args or []:
            if arg.startswith("-"):
                spelled.setdefault(arg.lstrip("-").split("=", 1)[0].replace("-", "_"), arg.split("=", 1)[0])
        flags = ", ".join(spelled.get(name, "--" + name) for name in unknown)
        raise ValueError(f"unrecognized arguments: {flags} (neither bm6b nor Apache Beam has these options)")
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    return options


def run_curate(config: CurateConfig, beam_args: list[str] | None = None) -> dict[str, Any]:
    """Run the curate job to completion and return the stats also written to ``stats.json``."""
    manifests, img2dataset_shards = split_img2dataset_inputs(config.inputs)
    config.img2dataset_inputs = [*config.img2dataset_inputs, *img2dataset_shards]
    if config.retry_failed:
        check_retry_output(config.retry_failed, config.output)
    if not (manifests or config.img2dataset_inputs or config.retry_failed):
        raise ValueError("no input: give manifest files, img2dataset output folders or --retry-failed PREVIOUS_OUTPUT")
    config.inputs = expand_inputs(manifests)
    for path in config.inputs:
        ingest.check_manifest(path, config.columns)
    options = pipeline_options(beam_args)
    prepare_output(config.output, config.overwrite)

    started = time.monotonic()
    pipeline = beam.Pipeline(runner=progress.runner_for(options), options=options)
    build_pipeline(pipeline, config)
    logger.info("curate: %d manifest(s) -> %s on %s", len(config.inputs), config.output,
                options.view_as(StandardOptions).runner)
    result = progress.run_with_progress(pipeline)
    elapsed = time.monotonic() - started
    unconverged = dedup_run.unconverged_nodes(result)
    if unconverged:
        logger.warning(
            "curate: connected components did not converge for %d node(s), so some duplicate clusters stay split "
            "and keep extra samples; raise --components-rounds (now %d)", unconverged, config.dedup.components_rounds,
        )

    stats = compute_stats(config.output, stages=_stages_run(config))
    stats["elapsed_s"] = round(elapsed, 3)
    stats["samples_per_s"] = round(stats["input_rows"] / elapsed, 2) if elapsed > 0 else None
    stats["clip_model"] = config.clip_model
    stats["unconverged_nodes"] = unconverged
    write_stats(config.output, stats)
    width = max((len(stage["stage"]) for stage in stats["stages"]), default=0)
    for stage in stats["stages"]:
        logger.info("stage %-*s in %7d  out %7d  rejected %s", width, stage["stage"], stage["in"], stage["out"],
                    stage["rejected"] or "-")

    from bm6b.report.render import write_run_report

    write_run_report(config.output)
    return stats


def _stages_run(config: CurateConfig) -> list[str]:
    clip_on = any(getattr(config, f) for f in ("clip_model", "clip_checkpoint", "clip_model_zh",
                                                "clip_checkpoint_zh", "clip_model_en", "clip_checkpoint_en"))
    skipped = set() if clip_on else {"clip"}
    if not config.dedup.urls:
        skipped.add("dedup_url")
    skipped |= {"decontam", "dedup_near_image", "dedup_caption"} - set(dedup_steps(config.dedup))
    skipped |= {"caption_frequency", "translate"} - set(caption_stages_run(config.captions))
    return [s for s in STAGE_ORDER if s not in skipped]

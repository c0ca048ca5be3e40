"""CLIP scoring as a Beam stage: an open_clip ``ModelHandler`` for ``RunInference`` and the score filter.

    records -> PrepareClipInputs (decode + image transform + tokenize, per record)
            -> RunInference(OpenClipModelHandler)  (BatchElements, one model per worker process)
            -> scores merged into the records
            -> FilterClipScores (absolute thresholds, or top fraction per language in two passes)

One model for both languages gives one RunInference step. With one model per language there is
one step per model, and each scores its own language.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from bm6b.filters import clip
from bm6b.filters.clip import LANGUAGES, ClipExample, ClipThresholds
from bm6b.pipelines.stages import REJECTS, RejectingDoFn, StageOutput, split_rejects

logger = logging.getLogger(__name__)

STAGE = "clip"


@dataclasses.dataclass(frozen=True)
class ClipModelSpec:
    """One model to load on the workers: config name, checkpoint (file, folder or tag), device, precision."""

    model_name: str | None
    checkpoint: str | None = None
    device: str = "cpu"
    precision: str = "fp32"  # fp32, or fp16 / bf16 on CUDA


@dataclasses.dataclass(frozen=True)
class ClipStageConfig:
    """The CLIP stage: which model scores each language, batching, thresholds and embeddings."""

    models: dict[str, ClipModelSpec]  # caption language -> model
    thresholds: ClipThresholds = dataclasses.field(default_factory=ClipThresholds)
    keep_embeddings: bool = False
    min_batch_size: int = 1
    max_batch_size: int = 64
    large_model: bool = False  # share one model between the worker processes of a machine

    def __post_init__(self):
        if not self.models:
            raise ValueError("the CLIP stage needs a model for at least one caption language")
        unknown = set(self.models) - set(LANGUAGES)
        if unknown:
            raise ValueError(f"unknown caption language(s) {sorted(unknown)} for CLIP models; use zh or en")
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ValueError(
                f"CLIP batch sizes must satisfy 1 <= min ({self.min_batch_size}) <= max ({self.max_batch_size})"
            )
        unscored = sorted((set(self.thresholds.min_score) | set(self.thresholds.top_fraction)) - set(self.models))
        if unscored:
            raise ValueError(f"a CLIP threshold is set for {', '.join(unscored)} but no model scores that language")
        if self.keep_embeddings and len(set(self.models.values())) > 1:
            raise ValueError(
                "keeping CLIP embeddings needs one model for both languages; with one model per language "
                "the image embeddings would differ"
            )

    def check_models(self) -> None:
        """Raise a clear error now for a model the workers could not load (unknown config, missing file, no CUDA)."""
        from bm6b.models.loading import check_device, resolve_source

        for spec, _ in self.groups():
            check_device(spec.device)
            resolve_source(spec.model_name, spec.checkpoint)

    def groups(self) -> list[tuple[ClipModelSpec, tuple[str, ...]]]:
        """Return each distinct model with the languages it scores, in zh, en order."""
        grouped: dict[ClipModelSpec, list[str]] = {}
        for language in LANGUAGES:
            if language in self.models:
                grouped.setdefault(self.models[language], []).append(language)
        return [(spec, tuple(languages)) for spec, languages in grouped.items()]


@dataclasses.dataclass
class LoadedClip:
    model: Any
    model_id: str


class OpenClipModelHandler(ModelHandler[ClipExample, PredictionResult, LoadedClip]):
    """Run open_clip on batches of prepared ``ClipExample``s.

    ``RunInference`` loads the model once per worker process and shares it between the threads of
    that process (with ``large_model``, once per machine). Each ``PredictionResult`` carries the
    example, a dict of scores (and float16 embeddings on request) and the model id.
    """

    def __init__(
        self,
        spec: ClipModelSpec,
        keep_embeddings: bool = False,
        min_batch_size: int = 1,
        max_batch_size: int = 64,
        large_model: bool = False,
    ):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size, large_model=large_model)
        self.spec = spec
        self.keep_embeddings = keep_embeddings

    def load_model(self) -> LoadedClip:
        from bm6b.models.loading import load_clip

        model, _, _, model_id = load_clip(
            self.spec.model_name, self.spec.checkpoint, self.spec.device, self.spec.precision
        )
        return LoadedClip(model, model_id)

    def run_inference(
        self, batch: Sequence[ClipExample], model: LoadedClip, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        results = clip.score_examples(model.model, batch, self.keep_embeddings)
        return [PredictionResult(example, result, model.model_id) for example, result in zip(batch, results)]

    def get_num_bytes(self, batch: Sequence[ClipExample]) -> int:
        # The default pickles the whole batch; the tensors' sizes are what matters.
        total = 0
        for example in batch:
            total += example.image.nelement() * example.image.element_size()
            total += sum(t.nelement() * t.element_size() for t in example.tokens.values())
        return total

    def get_metrics_namespace(self) -> str:
        return "bm6b_clip"


class _PrepareClipInputs(RejectingDoFn):
    stage = STAGE

    def __init__(self, spec: ClipModelSpec, languages: tuple[str, ...], count_input: bool):
        self.spec = spec
        self.languages = languages
        self.count_input = count_input

    def setup(self):
        super().setup()
        from bm6b.models.loading import load_transforms

        preprocess, tokenizer = load_transforms(self.spec.model_name, self.spec.checkpoint)
        self.preprocessor = clip.ClipPreprocessor(preprocess, tokenizer, self.languages)

    def process(self, record: dict[str, Any]):
        if self.count_input:
            self._in.inc()
        example, failure = self.preprocessor.prepare(record)
        if failure:
            yield self._reject(record, *failure)
        else:
            yield example


def _merge_prediction(prediction: PredictionResult) -> dict[str, Any]:
    return clip.apply_scores(prediction.example.record, prediction.inference, prediction.model_id)


class ScoreClip(beam.PTransform):
    """Add ``clip_score_zh``, ``clip_score_en``, ``clip_model`` (and embeddings) to each record."""

    def __init__(self, config: ClipStageConfig):
        super().__init__()
        self.config = config

    def expand(self, records):
        rejects = []
        for index, (spec, languages) in enumerate(self.config.groups()):
            label = "+".join(languages)
            prepared = records | f"Prepare[{label}]" >> beam.ParDo(
                _PrepareClipInputs(spec, languages, count_input=index == 0)
            ).with_outputs(REJECTS, main="examples")
            handler = OpenClipModelHandler(
                spec,
                keep_embeddings=self.config.keep_embeddings,
                min_batch_size=self.config.min_batch_size,
                max_batch_size=self.config.max_batch_size,
                large_model=self.config.large_model,
            )
            records = (
                prepared.examples
                | f"RunInference[{label}]" >> RunInference(handler)
                | f"Merge[{label}]" >> beam.Map(_merge_prediction)
            )
            rejects.append(prepared[REJECTS])
        return StageOutput(records, rejects | "FlattenRejects" >> beam.Flatten())


# ---------------------------------------------------------------- thresholds


def _scores_for_quantiles(record: dict[str, Any], languages: tuple[str, ...]):
    for language in languages:
        score = record.get(clip.score_field(language))
        if score is not None:
            yield language, score


class _FilterClipScores(RejectingDoFn):
    stage = STAGE

    def __init__(self, thresholds: ClipThresholds):
        self.thresholds = thresholds

    def setup(self):
        super().setup()
        self._logged = False

    def process(self, record: dict[str, Any], quantile_thresholds: dict[str, float] | None = None):
        limits = dict(self.thresholds.min_score)
        rules = {language: "minimum score" for language in limits}
        for language, value in (quantile_thresholds or {}).items():
            limits[language] = value
            rules[language] = f"top {self.thresholds.top_fraction[language]:.1%} of {language} scores"
        if not self._logged:
            logger.info("CLIP thresholds: %s", {k: f"{v:.4f} ({rules[k]})" for k, v in limits.items()} or "none")
            self._logged = True

        record.pop("clip_models", None)
        failure = clip.check_scores(record, limits, rules)
        if failure:
            yield self._reject(record, *failure)
        else:
            self._out.inc()
            yield record


class FilterClipScores(beam.PTransform):
    """Reject records below the CLIP thresholds as ``low_clip_score``.

    Top-fraction thresholds take two passes over the records: Beam's ``ApproximateQuantiles``
    per language first, then the filter with the thresholds as a side input.
    """

    def __init__(self, thresholds: ClipThresholds):
        super().__init__()
        self.thresholds = thresholds

    def expand(self, records):
        dofn = _FilterClipScores(self.thresholds)
        if not self.thresholds.top_fraction:
            return split_rejects(records, "Filter", dofn)

        fractions = dict(self.thresholds.top_fraction)
        languages = tuple(fractions)
        thresholds = (
            records
            | "ScoresByLanguage" >> beam.FlatMap(_scores_for_quantiles, languages)
            | "Quantiles" >> beam.ApproximateQuantiles.PerKey(num_quantiles=clip.NUM_QUANTILES)
            | "PickThreshold" >> beam.MapTuple(
                lambda language, quantiles: (language, clip.threshold_from_quantiles(quantiles, fractions[language]))
            )
        )
        results = records | "Filter" >> beam.ParDo(dofn, beam.pvalue.AsDict(thresholds)).with_outputs(
            REJECTS, main="records"
        )
        return StageOutput(results.records, results[REJECTS])


class ClipScoreAndFilter(beam.PTransform):
    """The whole CLIP stage: score, then filter; returns ``StageOutput(records, rejects)``."""

    def __init__(self, config: ClipStageConfig):
        super().__init__()
        self.config = config

    def expand(self, records):
        scored = records | "Score" >> ScoreClip(self.config)
        filtered = scored.records | "Threshold" >> FilterClipScores(self.config.thresholds)
        rejects = (scored.rejects, filtered.rejects) | "AllClipRejects" >> beam.Flatten()
        return StageOutput(filtered.records, rejects)


def stage_config_from_curate(config, check_models: bool = True) -> ClipStageConfig | None:
    """Build the CLIP stage config from a ``CurateConfig``'s ``clip_*`` fields; None when scoring is off.

    ``check_models`` verifies here that the checkpoints exist and the device is usable. Pass False
    when the job runs on remote workers (Dataflow, Flink, Spark): their image holds the weights and
    the GPU, which the launching machine may lack.

    ``clip_model``/``clip_checkpoint`` serve both languages; ``clip_model_zh``/``clip_model_en``
    (with their checkpoints) replace them for one language. ``clip_min_score`` and
    ``clip_top_fraction`` apply to every scored language unless a per-language value is set.
    """
    models = {}
    for language in LANGUAGES:
        own_name = getattr(config, f"clip_model_{language}")
        own_checkpoint = getattr(config, f"clip_checkpoint_{language}")
        if own_name or own_checkpoint:
            name, checkpoint = own_name or config.clip_model, own_checkpoint
        elif config.clip_model or config.clip_checkpoint:
            name, checkpoint = config.clip_model, config.clip_checkpoint
        else:
            continue
        models[language] = ClipModelSpec(name, checkpoint, config.clip_device, config.clip_precision)
    if not models:
        return None

    min_score, top_fraction = {}, {}
    for language in LANGUAGES:
        score = getattr(config, f"clip_min_score_{language}")
        fraction = getattr(config, f"clip_top_fraction_{language}")
        if score is None and fraction is None and language in models:
            score, fraction = config.clip_min_score, config.clip_top_fraction
        if score is not None:
            min_score[language] = score
        if fraction is not None:
            top_fraction[language] = fraction
    stage = ClipStageConfig(
        models=models,
        thresholds=ClipThresholds(min_score=min_score, top_fraction=top_fraction),
        keep_embeddings=config.clip_keep_embeddings,
        min_batch_size=config.clip_min_batch_size,
        max_batch_size=config.clip_batch_size,
    )
    if check_models:
        stage.check_models()
    else:
        logger.info("CLIP models are checked on the workers, not on this machine: %s",
                    ", ".join(f"{spec.model_name} ({spec.checkpoint or 'random init'}) on {spec.device}"
                              for spec, _ in stage.groups()))
    return stage

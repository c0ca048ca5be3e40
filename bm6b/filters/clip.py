"""CLIP score: cosine similarity between an image and each of its captions, plus the score filter.

The per-record steps are plain functions so they run without Beam:

- ``ClipPreprocessor`` decodes a record's image and tokenizes its captions (the work that stays
  outside the model call);
- ``score_examples`` runs one batch through an open_clip model and returns the scores, and the
  float16 embeddings on request;
- ``ClipThresholds`` and ``check_scores`` decide which records pass: an absolute minimum per
  language, or the top fraction per language over the run (its threshold comes from
  ``threshold_from_quantiles``).

``ClipScorer`` chains them for use outside a pipeline. The Beam stage is
``bm6b.pipelines.clip_inference``. Models load through ``bm6b.models.loading.load_clip``.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError

from bm6b.schemas import Reason

LANGUAGES = ("zh", "en")

# 1001 quantiles: the top-fraction threshold is resolved to 0.1 % of the run.
NUM_QUANTILES = 1001


def score_field(language: str) -> str:
    return f"clip_score_{language}"


def text_embedding_field(language: str) -> str:
    return f"clip_text_embedding_{language}"


IMAGE_EMBEDDING_FIELD = "clip_image_embedding"


@dataclasses.dataclass
class ClipExample:
    """One record ready for the model: its CHW float32 image tensor and one token row per caption."""

    record: dict[str, Any]
    image: Any  # torch.Tensor [3, H, W]
    tokens: dict[str, Any]  # language -> torch.Tensor [context_length]; only captions that exist


def decode_image(data: bytes | None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image; raise ValueError when that fails."""
    if not data:
        raise ValueError("the record has no image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise ValueError(f"cannot decode image: {len(data)} bytes in no format Pillow recognizes") from None
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image: {err}") from err
    return image.convert("RGB")


class ClipPreprocessor:
    """Turn records into ``ClipExample``s with a model's image transform and tokenizer."""

    def __init__(self, preprocess: Callable, tokenizer: Callable, languages: Sequence[str] = LANGUAGES):
        unknown = set(languages) - set(LANGUAGES)
        if unknown:
            raise ValueError(f"unknown caption language(s) {sorted(unknown)}; use {', '.join(LANGUAGES)}")
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.languages = tuple(languages)

    def prepare(self, record: dict[str, Any]) -> tuple[ClipExample | None, tuple[str, str] | None]:
        """Return ``(example, None)``, or ``(None, (reason, detail))`` when the image cannot be decoded."""
        try:
            image = decode_image(record.get("image"))
        except ValueError as err:
            return None, (Reason.DECODE_ERROR.value, f"CLIP input: {err}")
        tokens = {}
        for language in self.languages:
            caption = record.get(f"caption_{language}")
            if caption:
                tokens[language] = self.tokenizer([caption])[0]
        return ClipExample(record, self.preprocess(image), tokens), None


def score_examples(
    model,
    examples: Sequence[ClipExample],
    keep_embeddings: bool = False,
) -> list[dict[str, Any]]:
    """Run one batch through ``model`` and return, per example, its scores (and embeddings).

    Each result contains ``clip_score_{lang}`` (a float, the cosine similarity of the L2-normalized
    image and text embeddings) for every language the example has tokens for. With
    ``keep_embeddings`` it also contains ``clip_image_embedding`` and ``clip_text_embedding_{lang}``
    as lists of float16 values. The model runs in its own dtype on its own device.
    """
    import torch

    if not examples:
        return []
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    results: list[dict[str, Any]] = [{} for _ in examples]

    with torch.inference_mode():
        images = torch.stack([e.image for e in examples]).to(device=device, dtype=dtype, non_blocking=True)
        image_features = model.encode_image(images, normalize=True)
        if keep_embeddings:
            image_rows = image_features.to(torch.float16).cpu().tolist()
            for result, row in zip(results, image_rows):
                result[IMAGE_EMBEDDING_FIELD] = row

        languages = sorted({language for e in examples for language in e.tokens}, key=LANGUAGES.index)
        for language in languages:
            rows = [i for i, e in enumerate(examples) if language in e.tokens]
            tokens = torch.stack([examples[i].tokens[language] for i in rows]).to(device, non_blocking=True)
            text_features = model.encode_text(tokens, normalize=True)
            scores = (image_features[rows].float() * text_features.float()).sum(dim=-1).cpu().tolist()
            for i, score in zip(rows, scores):
                results[i][score_field(language)] = score
            if keep_embeddings:
                text_rows = text_features.to(torch.float16).cpu().tolist()
                for i, row in zip(rows, text_rows):
                    results[i][text_embedding_field(language)] = row
    return results


def apply_scores(record: dict[str, Any], result: dict[str, Any], model_id: str) -> dict[str, Any]:
    """Copy one ``score_examples`` result into ``record`` and note which model scored which language."""
    record.update(result)
    models = record.setdefault("clip_models", {})
    for language in LANGUAGES:
        if score_field(language) in result:
            models[language] = model_id
    record["clip_model"] = format_model_ids(models)
    return record


def format_model_ids(models: dict[str, str]) -> str | None:
    """Return the ``clip_model`` value: one id, or ``zh=ID;en=ID`` when the languages used different models."""
    if not models:
        return None
    ids = set(models.values())
    if len(ids) == 1:
        return ids.pop()
    return ";".join(f"{language}={models[language]}" for language in LANGUAGES if language in models)


# ---------------------------------------------------------------- thresholds


@dataclasses.dataclass(frozen=True)
class ClipThresholds:
    """The CLIP score filter: per language, an absolute minimum score or a top fraction of the run.

    A record passes when every caption that has a score meets its language's rule. Captions of a
    language without a rule are never filtered.
    """

    min_score: dict[str, float] = dataclasses.field(default_factory=dict)
    top_fraction: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for language in (*self.min_score, *self.top_fraction):
            if language not in LANGUAGES:
                raise ValueError(f"unknown caption language {language!r} in CLIP thresholds; use zh or en")
        both = sorted(set(self.min_score) & set(self.top_fraction))
        if both:
            raise ValueError(
                f"CLIP threshold for {', '.join(both)}: set either a minimum score or a top fraction, not both"
            )
        for language, fraction in self.top_fraction.items():
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"CLIP top fraction for {language} must be in (0, 1], got {fraction}")
        for language, score in self.min_score.items():
            if not -1.0 <= score <= 1.0:
                raise ValueError(f"CLIP minimum score for {language} must be a cosine in [-1, 1], got {score}")

    @property
    def active(self) -> bool:
        return bool(self.min_score or self.top_fraction)


def threshold_from_quantiles(quantiles: Sequence[float], fraction: float) -> float:
    """Return the score at the ``1 - fraction`` quantile of the evenly spaced ``quantiles``.

    ``quantiles[0]`` is the minimum and ``quantiles[-1]`` the maximum, as Beam's
    ``ApproximateQuantiles`` returns them. On inputs small enough for Beam to keep every value,
    the result equals ``numpy.quantile(scores, 1 - fraction, method="lower")``.
    """
    if not quantiles:
        raise ValueError("no quantiles to pick a CLIP threshold from")
    index = round((1.0 - fraction) * (len(quantiles) - 1))
    return float(quantiles[index])


def check_scores(
    record: dict[str, Any], thresholds: dict[str, float], rules: dict[str, str] | None = None
) -> tuple[str, str] | None:
    """Return ``None`` when every scored caption meets its language's threshold, else a reject.

    The reject is ``("low_clip_score", detail)``, where the detail names each failing language
    with its score and threshold (and the rule behind it, from ``rules``). A NaN score fails.
    """
    failures = []
    for language in LANGUAGES:
        threshold = thresholds.get(language)
        score = record.get(score_field(language))
        if threshold is None or score is None:
            continue
        if math.isnan(score) or score < threshold:
            rule = f" ({rules[language]})" if rules and language in rules else ""
            failures.append(f"{language} score {score:.4f} < threshold {threshold:.4f}{rule}")
    if failures:
        return Reason.LOW_CLIP_SCORE.value, "; ".join(failures)
    return None


# ---------------------------------------------------------------- direct scoring


class ClipScorer:
    """Score records in place without Beam: the same loader, preprocessing and model call as the stage."""

    def __init__(
        self,
        model_name: str | None,
        checkpoint: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        languages: Sequence[str] = LANGUAGES,
        keep_embeddings: bool = False,
    ):
        from bm6b.models.loading import load_clip

        self.model, preprocess, tokenizer, self.model_id = load_clip(model_name, checkpoint, device, precision)
        self.preprocessor = ClipPreprocessor(preprocess, tokenizer, languages)
        self.keep_embeddings = keep_embeddings

    def score_batch(self, records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], tuple[str, str]]]:
        """Fill ``clip_score_{lang}`` and ``clip_model`` of each record in place.

        Returns ``(record, (reason, detail))`` for each record whose image fails to decode.
        """
        examples = []
        failed = []
        for record in records:
            example, failure = self.preprocessor.prepare(record)
            if example is None:
                failed.append((record, failure))
            else:
                examples.append(example)
        results = score_examples(self.model, examples, self.keep_embeddings)
        for example, result in zip(examples, results):
            apply_scores(example.record, result, self.model_id)
        return failed

"""The caption stages as Beam PTransforms, configured by a ``CaptionConfig``.

    records -> Captions (normalize, boilerplate; stage "captions")
            -> LanguageId (lid.176, quality rules, Chinese script; stage "lid")
            -> CaptionFrequency (whole run: captions seen > max_caption_repeats; stage "caption_frequency")
            -> TranslateCheck (only with translate_check; stage "translate")

``apply_caption_stages`` chains them and returns the kept records and one rejects PCollection per
stage. The per-record work is in ``bm6b.filters.captions``.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam

from bm6b.filters import captions
from bm6b.filters.caption_config import CaptionConfig
from bm6b.pipelines.stages import RejectingDoFn, StageOutput, split_rejects

STAGES = ("captions", "lid", "caption_frequency", "translate")

# Records per language-ID batch. A bundle's last batch may be smaller.
LID_BATCH_SIZE = 256


class _RecordStage(RejectingDoFn):
    """Apply one per-record function that returns (record, failure or None)."""

    def _emit(self, record: dict[str, Any], failure):
        if failure:
            return self._reject(record, *failure)
        self._out.inc()
        return record


class _Normalize(_RecordStage):
    stage = "captions"

    def __init__(self, config: CaptionConfig):
        self.config = config

    def process(self, record: dict[str, Any]):
        self._in.inc()
        yield self._emit(*captions.normalize_record(record, self.config))


class _LanguageId(_RecordStage):
    """Language ID on batches of records from ``beam.BatchElements``."""

    stage = "lid"

    def __init__(self, config: CaptionConfig):
        self.config = config

    def setup(self):
        super().setup()
        self.model = captions.load_lid_model()

    def process(self, batch: list[dict[str, Any]]):
        for record, failure in captions.assign_languages_batch(batch, self.model, self.config):
            self._in.inc()
            yield self._emit(record, failure)


class _DropFrequent(_RecordStage):
    stage = "caption_frequency"

    def __init__(self, max_repeats: int):
        self.max_repeats = max_repeats

    def process(self, record: dict[str, Any], frequent: dict[str, int]):
        self._in.inc()
        yield self._emit(*captions.drop_frequent_captions(record, frequent, self.max_repeats))


class _Translate(_RecordStage):
    stage = "translate"

    def __init__(self, config: CaptionConfig):
        self.config = config

    def setup(self):
        super().setup()
        from bm6b.filters.translate import TranslateChecker

        self.checker = TranslateChecker(self.config)

    def process(self, record: dict[str, Any]):
        self._in.inc()
        yield self._emit(*captions.check_translation(record, self.checker))


class NormalizeCaptions(beam.PTransform):
    """Normalize captions and strip boilerplate; rows with no caption left are rejected as empty_caption."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.config = config

    def expand(self, records):
        return split_rejects(records, "Normalize", _Normalize(self.config))


class LanguageId(beam.PTransform):
    """Language ID, quality rules and Chinese script per caption; captions move to their zh or en slot."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.config = config

    def expand(self, records):
        # A fastText call costs about half as much when the calls of a batch run back to back, away
        # from the Python rules (measured on the 2-vCPU development VM).
        batches = records | "Batch" >> beam.BatchElements(min_batch_size=LID_BATCH_SIZE, max_batch_size=LID_BATCH_SIZE)
        return split_rejects(batches, "Detect", _LanguageId(self.config))


class CaptionFrequency(beam.PTransform):
    """Drop captions that occur in more than ``max_repeats`` rows of the whole run (boilerplate).

    Counts each language's lower-cased caption over all records, keeps the keys above the limit
    as a side input (a small dict even for large runs), and removes those captions.
    """

    def __init__(self, max_repeats: int):
        super().__init__()
        self.max_repeats = max_repeats

    def expand(self, records):
        max_repeats = self.max_repeats
        frequent = (
            records
            | "CaptionKeys" >> beam.FlatMap(captions.caption_frequency_keys)
            | "CountCaptions" >> beam.combiners.Count.PerElement()
            | "OverLimit" >> beam.Filter(lambda item: item[1] > max_repeats)
        )
        results = records | "DropFrequent" >> beam.ParDo(
            _DropFrequent(max_repeats), frequent=beam.pvalue.AsDict(frequent)
        ).with_outputs("rejects", main="records")
        return StageOutput(results.records, results.rejects)


class TranslateCheck(beam.PTransform):
    """Reject rows whose zh and en captions are not translations of each other (translation_mismatch)."""

    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.config = config

    def expand(self, records):
        return split_rejects(records, "Score", _Translate(self.config))


def apply_caption_stages(records, config: CaptionConfig) -> tuple[beam.PCollection, list[beam.PCollection]]:
    """Chain the caption stages on ``records``; return the kept records and each stage's rejects."""
    normalized = records | "Captions" >> NormalizeCaptions(config)
    identified = normalized.records | "LanguageId" >> LanguageId(config)
    kept, rejects = identified.records, [normalized.rejects, identified.rejects]

    if config.max_caption_repeats > 0:
        frequency = kept | "CaptionFrequency" >> CaptionFrequency(config.max_caption_repeats)
        kept = frequency.records
        rejects.append(frequency.rejects)

    if config.translate_check:
        checked = kept | "TranslateCheck" >> TranslateCheck(config)
        kept = checked.records
        rejects.append(checked.rejects)
    return kept, rejects


def caption_stages_run(config: CaptionConfig) -> list[str]:
    """Names of the stages ``apply_caption_stages`` adds for ``config``, for the run statistics."""
    names = ["captions", "lid"]
    if config.max_caption_repeats > 0:
        names.append("caption_frequency")
    if config.translate_check:
        names.append("translate")
    return names

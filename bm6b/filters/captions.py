"""Per-record caption logic of the curate job: normalization, language ID, quality rules, translate-check.

The rules themselves live in ``text_normalize``, ``lid``, ``text_quality`` and ``translate``; this
module applies them to a sample record and turns failures into reject reasons. Thresholds come from
a ``CaptionConfig`` (``caption_config_from_args`` builds one from the CLI options).

Record fields written: ``caption_zh``, ``caption_en``, ``lid_zh``, ``lid_zh_score``, ``lid_en``,
``lid_en_score``. Transient fields, kept in the record dict but not in ``RECORD_SCHEMA``:
``lid_zh_mixed`` / ``lid_en_mixed``, ``zh_script``, ``caption_zh_original`` (the traditional text
before OpenCC conversion), ``caption_issues`` (captions dropped by a rule) and ``translate_score``.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from bm6b.filters import lid as lid_module
from bm6b.filters import text_normalize
from bm6b.filters.caption_config import ZH_LABELS, CaptionConfig, bundled_list
from bm6b.filters.lid import identify, identify_from_labels, load_lid_model, normalize_script, predict_labels
from bm6b.filters.text_normalize import normalize_caption as _normalize
from bm6b.filters.text_quality import content_issue, junk_issue, load_blocklist, load_boilerplate, strip_boilerplate
from bm6b.schemas.reasons import Reason

logger = logging.getLogger(__name__)

# The compiled rules, or None. text_normalize imports them once for every caption module (see speedups).
_fast = text_normalize._fast

# fastText labels that go into the caption_zh slot.
CHINESE_LABELS = frozenset(ZH_LABELS)

DEFAULT_CONFIG = CaptionConfig()
Failure = tuple[str, str]


def normalize_caption(text: str | None, config: CaptionConfig | None = None) -> str | None:
    """Return the normalized caption (see ``text_normalize``), or None when nothing is left."""
    return _normalize(text, config or DEFAULT_CONFIG) or None


def lid_model_path() -> str:
    return lid_module.lid_model_path()


def detect_language(text: str, model=None, config: CaptionConfig | None = None) -> tuple[str, float]:
    """Return the corrected lid.176 label of a caption and its probability (see ``lid.identify``)."""
    result = identify(text, config or DEFAULT_CONFIG, model)
    return result.label, result.score


def normalize_record(record: dict[str, Any], config: CaptionConfig | None = None) -> tuple[dict[str, Any], Failure | None]:
    """Normalize every caption of a record in place; reject the record if no caption is left."""
    config = config or DEFAULT_CONFIG
    if _fast is not None and type(record) is dict:
        return _fast.normalize_record(record, config)
    record["caption_zh"] = normalize_caption(record.get("caption_zh"), config)
    record["caption_en"] = normalize_caption(record.get("caption_en"), config)
    record["captions"] = [c for c in (normalize_caption(c, config) for c in record.get("captions") or []) if c]
    if not (record["caption_zh"] or record["caption_en"] or record["captions"]):
        return record, (Reason.EMPTY_CAPTION.value, "no caption left after normalization")
    return record, None


# Record keys of each slot: caption, label, score, mixed flag (built once, not per record).
_SLOT_KEYS = {slot: (f"caption_{slot}", f"lid_{slot}", f"lid_{slot}_score", f"lid_{slot}_mixed") for slot in ("zh", "en")}


def _place(record: dict[str, Any], slot: str, text: str, result: lid_module.LidResult) -> None:
    caption_key, label_key, score_key, mixed_key = _SLOT_KEYS[slot]
    record[caption_key] = text
    record[label_key] = result.label
    record[score_key] = result.score
    record[mixed_key] = result.mixed


def assign_languages(record: dict[str, Any], model=None, config: CaptionConfig | None = None) -> tuple[dict[str, Any], Failure | None]:
    """Strip boilerplate, run language ID and the quality rules on each caption, and fill its slot.

    A caption from an explicit zh or en column stays in its slot unless language ID finds another
    language: it moves to the other slot when that language is the other slot's and the slot is
    empty, and it is dropped when another language reaches ``column_override_confidence``.
    Captions of unknown language go to the slot language ID chooses. A caption that fails a
    quality rule is dropped and listed in ``caption_issues``. A record left with no caption is
    rejected as ``caption_filtered`` when a rule dropped a caption, else ``unsupported_language``.
    """
    return assign_languages_batch([record], model, config)[0]


def assign_languages_batch(records: list[dict[str, Any]], model=None,
                           config: CaptionConfig | None = None) -> list[tuple[dict[str, Any], Failure | None]]:
    """Apply ``assign_languages`` to each record, running the fastText calls of all records back to back.

    The results are the same as one record at a time. Interleaved with the Python rules, each
    fastText call took about twice as long on the 2-vCPU development VM, because the rules push
    the model's tables out of the CPU cache. Batches of 64 to 256 records recovered most of that.
    """
    config = config or DEFAULT_CONFIG
    model = model or load_lid_model()
    if _fast is not None and type(records) is list and all(type(record) is dict for record in records):
        return _fast.assign_languages_batch(records, model, config)

    prepared = [_prepare_candidates(record, config) for record in records]
    # NOTE: one call per caption, because fasttext-predict 0.9.2.4 has no list call that returns
    # probabilities. Its native multilinePredict returns labels only, and model.predict(list) raises.
    labels = [
        [predict_labels(stripped, model) if issue is None else None for _, _, stripped, issue in candidates]
        for candidates in prepared
    ]
    return [
        _fill_slots(record, candidates, candidate_labels, config)
        for record, candidates, candidate_labels in zip(records, prepared, labels)
    ]


def _prepare_candidates(record: dict[str, Any], config: CaptionConfig) -> list[tuple[str | None, str, str | None, str | None]]:
    """Empty the slots of ``record`` and return its captions as (column slot, text, stripped text, issue).

    The stripped text is None when junk detection or boilerplate removal already dropped the caption,
    and the issue then contains the reason.
    """
    candidates: list[tuple[str | None, str]] = []
    for slot, (caption_key, label_key, score_key, _) in _SLOT_KEYS.items():
        text = record.get(caption_key)
        if text:
            candidates.append((slot, text))
        record[caption_key] = None
        record[label_key] = None
        record[score_key] = None
    candidates.extend((None, text) for text in record.pop("captions", None) or [])
    record["captions"] = []

    prepared = []
    for column_slot, text in candidates:
        # File names and URLs are junk in any language, and stripping would hide them.
        issue = junk_issue(text)
        if issue is not None:
            prepared.append((column_slot, text, None, f"{column_slot or 'caption'}: {issue}"))
            continue
        stripped = text
        if config.strip_boilerplate:
            stripped = strip_boilerplate(text, config)
            if not stripped:
                prepared.append((column_slot, text, None, f"{column_slot or 'caption'}: boilerplate: only boilerplate phrases and URLs"))
                continue
        # Language ID runs after boilerplate removal: "— 图库矢量图片" would make an English caption zh.
        prepared.append((column_slot, text, stripped, None))
    return prepared


def _fill_slots(record: dict[str, Any], candidates, candidate_labels, config: CaptionConfig) -> tuple[dict[str, Any], Failure | None]:
    unplaced: list[str] = []
    issues: list[str] = []
    for (column_slot, text, stripped, issue), probs in zip(candidates, candidate_labels):
        if stripped is None:
            issues.append(issue)
            continue

        result = identify_from_labels(stripped, probs, config)
        slot = result.slot
        if slot is None and column_slot is not None and result.score < config.column_override_confidence:
            slot = column_slot
        if slot is None or record[_SLOT_KEYS[slot][0]]:
            prefix = f"{column_slot} column " if column_slot else ""
            unplaced.append(f"{prefix}detected {result.label}:{result.score:.2f}")
            continue

        # These are the rules of check_caption. Junk detection already ran, unless stripping changed the text.
        quality = junk_issue(stripped) if stripped != text else None
        if quality is None:
            quality = content_issue(stripped, result.label, config)
        if quality is not None:
            issues.append(f"{slot}: {quality}")
            continue
        _place(record, slot, stripped, result)

    if record.get("caption_zh"):
        converted, script, original = normalize_script(record["caption_zh"], config)
        record["caption_zh"] = converted
        record["zh_script"] = script
        record["caption_zh_original"] = original

    record["caption_issues"] = issues + unplaced
    if record.get("caption_zh") or record.get("caption_en"):
        return record, None
    if issues:
        return record, (Reason.CAPTION_FILTERED.value, "; ".join(issues + unplaced))
    return record, (Reason.UNSUPPORTED_LANGUAGE.value, "; ".join(unplaced))


def check_translation(record: dict[str, Any], checker) -> tuple[dict[str, Any], Failure | None]:
    """Score a record with both captions with ``checker`` (a ``TranslateChecker``); others pass unscored."""
    zh, en = record.get("caption_zh"), record.get("caption_en")
    if not (zh and en):
        record["translate_score"] = None
        return record, None
    accepted, result = checker.is_translation(zh, en)
    record["translate_score"] = result.combined
    if accepted:
        return record, None
    return record, (Reason.TRANSLATION_MISMATCH.value, result.detail())


def caption_frequency_keys(record: dict[str, Any]) -> list[str]:
    """Keys under which the whole-run frequency step counts a record's captions (one per language)."""
    keys = []
    for slot in ("zh", "en"):
        text = record.get(f"caption_{slot}")
        if text:
            keys.append(f"{slot}\0{text.lower()}")
    return keys


def drop_frequent_captions(record: dict[str, Any], frequent: dict[str, int], max_repeats: int) -> tuple[dict[str, Any], Failure | None]:
    """Remove captions seen more than ``max_repeats`` times in the run; reject a record left with none."""
    dropped = []
    for key in caption_frequency_keys(record):
        count = frequent.get(key)
        if count is None:
            continue
        slot = key.split("\0", 1)[0]
        dropped.append(f"{slot}: caption seen {count} times > {max_repeats}")
        record[f"caption_{slot}"] = None
        record[f"lid_{slot}"] = None
        record[f"lid_{slot}_score"] = None
    if dropped and not (record.get("caption_zh") or record.get("caption_en")):
        return record, (Reason.CAPTION_FILTERED.value, "; ".join(dropped))
    if dropped:
        record.setdefault("caption_issues", []).extend(dropped)
    return record, None


# ---------------------------------------------------------------- command line


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the caption-stage options (normalization, language ID, quality rules, translate-check)."""
    defaults = DEFAULT_CONFIG
    group = parser.add_argument_group(
        "captions",
        "Caption normalization, language ID (fastText lid.176 lite), quality rules and the optional "
        "zh/en translate-check. A caption that fails a rule is dropped; a sample left with no caption is "
        "rejected as caption_filtered or unsupported_language.",
    )
    group.add_argument("--min-zh-chars", type=int, default=defaults.min_zh_chars,
                       help="minimum Chinese caption length in Han characters plus Latin words (default: %(default)s)")
    group.add_argument("--max-zh-chars", type=int, default=defaults.max_zh_chars,
                       help="maximum Chinese caption length in Han characters plus Latin words (default: %(default)s)")
    group.add_argument("--min-en-words", type=int, default=defaults.min_en_words, help="minimum English caption words (default: %(default)s)")
    group.add_argument("--min-en-chars", type=int, default=defaults.min_en_chars,
                       help="minimum English caption characters, spaces excluded (default: %(default)s)")
    group.add_argument("--max-en-words", type=int, default=defaults.max_en_words, help="maximum English caption words (default: %(default)s)")
    group.add_argument("--max-special-char-ratio", type=float, default=defaults.max_special_char_ratio,
                       help="maximum share of symbols other than sentence punctuation (default: %(default)s)")
    group.add_argument("--min-lid-confidence", action="append", default=[], metavar="LANG=P",
                       help="minimum language-ID probability for zh, en or one label such as yue "
                       f"(repeatable; defaults {defaults.min_lid_confidence})")
    group.add_argument("--caption-blocklist", action="append", default=[], metavar="LANG=FILE",
                       help="a blocklist file, one term per line; zh terms match as substrings, other languages "
                       "as whole words (repeatable; replaces the bundled list of that language)")
    group.add_argument("--boilerplate-file", action="append", default=[], metavar="FILE",
                       help="a file of regular expressions removed from captions (repeatable; replaces the bundled one)")
    group.add_argument("--no-strip-boilerplate", action="store_true", help="keep stock-photo phrases and URLs in captions")
    group.add_argument("--convert-traditional", action="store_true",
                       help="convert traditional Chinese captions to simplified with OpenCC t2s")
    group.add_argument("--max-caption-repeats", type=int, default=defaults.max_caption_repeats,
                       help="drop captions seen in more than this many rows of the run (0: off) (default: %(default)s)")
    group.add_argument("--translate-check", action="store_true",
                       help="reject samples whose zh and en captions are not translations of each other "
                       "(translation_mismatch); leave it off for sources whose captions were written independently")
    group.add_argument("--translate-threshold", type=float, default=defaults.translate_threshold,
                       help="minimum combined translate-check score, 0 to 1 (default: %(default)s)")
    group.add_argument("--translate-embedding-model", metavar="FILE|MODULE:CALLABLE",
                       help="text encoder whose cosine joins the translate-check score: a file from "
                            "`bm6b train-text-encoder`, or a factory given as module:callable")
    group.add_argument("--translate-embedding-weight", type=float, default=0.0,
                       help="logistic weight of the embedding cosine in the translate-check score (default: %(default)s)")
    group.add_argument("--translate-embedding-center", type=float, default=defaults.embedding_center,
                       help="embedding cosine that neither raises nor lowers the translate-check score "
                            "(default: %(default)s)")


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise ValueError(f"invalid {option} {value!r}; expected LANG=VALUE, e.g. zh=0.6")
        pairs[key] = rest
    return pairs


def _check_caption_limits(args: argparse.Namespace) -> None:
    """Raise ValueError for a caption option out of range; NaN would silently turn a rule off."""
    for option, value in (("--max-special-char-ratio", args.max_special_char_ratio),
                          ("--translate-threshold", args.translate_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"invalid {option} {value}: expected a value between 0 and 1")
    for option, value in (("--min-zh-chars", args.min_zh_chars), ("--max-zh-chars", args.max_zh_chars),
                          ("--min-en-words", args.min_en_words), ("--min-en-chars", args.min_en_chars),
                          ("--max-en-words", args.max_en_words), ("--max-caption-repeats", args.max_caption_repeats)):
        if value < 0:
            raise ValueError(f"invalid {option} {value}: expected 0 or more")
    for low, high in ((("--min-zh-chars", args.min_zh_chars), ("--max-zh-chars", args.max_zh_chars)),
                      (("--min-en-words", args.min_en_words), ("--max-en-words", args.max_en_words))):
        if low[1] > high[1]:
            raise ValueError(f"{low[0]} {low[1]} is above {high[0]} {high[1]}, so every caption would be rejected")


def caption_config_from_args(args: argparse.Namespace) -> CaptionConfig:
    """Build the CaptionConfig of a run from the options added by ``add_caption_arguments``."""
    _check_caption_limits(args)
    defaults = DEFAULT_CONFIG
    confidence = dict(defaults.min_lid_confidence)
    for language, value in _pairs(args.min_lid_confidence, "--min-lid-confidence").items():
        try:
            probability = float(value)
        except ValueError as err:
            raise ValueError(f"invalid --min-lid-confidence {language}={value!r}; expected a number") from err
        if not 0.0 <= probability <= 1.0:
            # NaN fails this test too; a NaN minimum would reject every caption of the language.
            raise ValueError(f"invalid --min-lid-confidence {language}={value!r}; expected a probability between 0 and 1")
        # lid.176 labels are lower case ("zh", "yue"), so "ZH" or " zh " would otherwise be ignored.
        confidence[language.strip().lower()] = probability

    blocklists = dict(defaults.blocklist_files)
    for language, path in _pairs(args.caption_blocklist, "--caption-blocklist").items():
        blocklists[language] = (path,)

    weights = dict(defaults.weights)
    weights["embedding"] = args.translate_embedding_weight
    config = defaults.replace(
        min_zh_chars=args.min_zh_chars,
        max_zh_chars=args.max_zh_chars,
        min_en_words=args.min_en_words,
        min_en_chars=args.min_en_chars,
        max_en_words=args.max_en_words,
        max_special_char_ratio=args.max_special_char_ratio,
        min_lid_confidence=confidence,
        blocklist_files=blocklists,
        boilerplate_files=tuple(args.boilerplate_file) or (bundled_list("boilerplate.txt"),),
        strip_boilerplate=not args.no_strip_boilerplate,
        convert_traditional=args.convert_traditional,
        max_caption_repeats=args.max_caption_repeats,
        translate_check=args.translate_check,
        translate_threshold=args.translate_threshold,
        embedding_model=args.translate_embedding_model,
        embedding_center=args.translate_embedding_center,
        weights=weights,
    )

    # Read the list files now, so a missing file or a bad pattern fails before the pipeline starts.
    load_boilerplate(tuple(config.boilerplate_files))
    for language, paths in config.blocklist_files.items():
        load_blocklist(language, tuple(paths))
    _check_embedding_options(args)
    return config


def _check_embedding_options(args: argparse.Namespace) -> None:
    """Check the translate-check encoder options before the pipeline starts.

    Workers load the encoder only when the translate-check stage starts, after the images are
    downloaded, so a missing or damaged encoder file is caught here instead.
    """
    for option, value in (("--translate-embedding-weight", args.translate_embedding_weight),
                          ("--translate-embedding-center", args.translate_embedding_center)):
        if not math.isfinite(value):
            raise ValueError(f"invalid {option} {value}: expected a finite number")
    spec = args.translate_embedding_model
    if not spec:
        return
    if not args.translate_check:
        logger.warning("--translate-embedding-model %s has no effect without --translate-check", spec)
        return
    if args.translate_embedding_weight <= 0.0:
        logger.warning("--translate-embedding-model %s has no effect with --translate-embedding-weight %s; "
                       "set a positive weight (fit one with benchmarks/translate_check.py --fit)",
                       spec, args.translate_embedding_weight)
    from bm6b.filters.translate import check_encoder

    check_encoder(spec)


__all__ = [
    "CHINESE_LABELS",
    "add_caption_arguments",
    "assign_languages",
    "assign_languages_batch",
    "caption_config_from_args",
    "check_translation",
    "detect_language",
    "drop_frequent_captions",
    "load_lid_model",
    "lid_model_path",
    "normalize_caption",
    "normalize_record",
]

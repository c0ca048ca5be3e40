"""Caption normalization: one canonical form for every caption before language ID and filters.

Steps, in order: cut to ``max_input_chars``, lone surrogates to U+FFFD, HTML entities (twice, for
double-escaped text), HTML tags, mojibake repair with ftfy, terminal escape sequences, control and
zero-width characters, Unicode NFKC with Chinese punctuation kept full-width after Han characters,
whitespace. Pure ASCII captions without ``&`` or ``<`` skip the Unicode steps, which keeps the
common English case cheap.

Terminal escape sequences (ECMA-48, e.g. ``ESC [ 1 ; 3 1 m`` for bold red) are removed whole, so
no ``[31m`` is left behind when the ESC itself is dropped as a control character. Only sequences
that start with ESC (U+001B) are removed. Text such as ``[2J`` without an ESC stays, because it
can be part of a real caption. The 8-bit introducers U+009B (CSI) and U+009D (OSC) are left to the
control step too, because U+009B is also what the cp1252 byte 0x9B ("›") becomes when text is
decoded as Latin-1. A sequence cut off before its final byte or terminator stays, except its ESC.
"""

from __future__ import annotations

import html
import re
import unicodedata

import ftfy

from bm6b.filters import speedups
from bm6b.filters.caption_config import CaptionConfig

HAN_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
KANA_CLASS = "\u3040-\u30ff\u31f0-\u31ff"
HANGUL_CLASS = "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"

_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_ENTITY_RE = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]{1,31});")

# Zero-width and invisible format characters: soft hyphen, ZWSP..RLM, bidi embeddings and
# isolates, word joiner..invisible plus, BOM, variation selectors, tag characters.
_INVISIBLE_RE = re.compile(
    "[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ufe00-\ufe0f"
    "\U000e0000-\U000e007f]"
)
# Lone surrogates, from JSON "\\ud800" escapes or UTF-16 cut in half. UTF-8 (Parquet, fastText)
# cannot encode them, so each becomes U+FFFD, the Unicode replacement character.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# Terminal escape sequences that start with ESC, in ECMA-48 terms, in four forms:
# - CSI: ESC [, parameter bytes, intermediate bytes, one final byte;
# - a control string: ESC ] (OSC) or ESC P, X, ^ or _, ended by ST (ESC \) or BEL;
# - an nF sequence such as ESC ( B;
# - ESC with one final byte, such as ESC 7.
# The possessive quantifiers never backtrack, and no class contains ESC. So a match attempt never
# reads past the next ESC, and the whole search is linear in the text length.
_TERMINAL_ESCAPE_RE = re.compile(
    r"\x1b\[[0-?]*+[ -/]*+[@-~]"
    r"|\x1b[\]PX^_][^\x07\x1b]*+(?:\x07|\x1b\\)"
    r"|\x1b[ -/]++[0-~]"
    r"|\x1b[0-OQ-WYZ\\`-~]"
)
# C0 and C1 controls, and line or paragraph separators; they become a space.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Characters typical of UTF-8 or GBK text decoded as Latin-1 or cp1252; only then is ftfy run.
_MOJIBAKE_HINT_RE = re.compile("[\u00c0-\u00ff\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2020\u2021\u2030\u2039\u203a\u20ac\u2122]")

# Full-width punctuation that Chinese text uses; NFKC would turn it into ASCII. It stays
# full-width when it follows a Han character (or a closing bracket after one).
_ZH_PUNCT = "\uff0c\uff01\uff1f\uff1a\uff1b\uff08\uff09"
_KEEP_ZH_PUNCT_RE = re.compile(f"(?<=[{HAN_CLASS}\uff09\u3001\u3002])([{_ZH_PUNCT}])")
_HAN_SPACE_RE = re.compile(f"(?<=[{HAN_CLASS}\u3001\u3002{_ZH_PUNCT}])\\s+(?=[{HAN_CLASS}])|(?<=[{HAN_CLASS}])\\s+(?=[{_ZH_PUNCT}\u3001\u3002])")
_SPACE_RE = re.compile(r"\s+")

# Any character that one of the steps before NFKC, or the whitespace step, acts on. Text without
# one of them changes only by NFKC (see normalize_caption).
_PRE_NFKC_RE = re.compile(
    "[&<\\s" + _MOJIBAKE_HINT_RE.pattern[1:-1] + _INVISIBLE_RE.pattern[1:-1] + _CONTROL_RE.pattern[1:-1]
    + _SURROGATE_RE.pattern[1:-1] + "]"
)


def unescape_html(text: str) -> str:
    """Decode HTML entities, twice at most, so ``&amp;quot;`` also becomes ``"``."""
    for _ in range(2):
        if not _ENTITY_RE.search(text):
            break
        text = html.unescape(text)
    return text


def strip_tags(text: str) -> str:
    return _TAG_RE.sub(" ", text)


def repair_mojibake(text: str) -> str:
    if not _MOJIBAKE_HINT_RE.search(text):
        return text
    return ftfy.fix_encoding(text)


def strip_terminal_escapes(text: str) -> str:
    """Remove the terminal escape sequences that start with ESC, as the module docstring describes."""
    if "\x1b" not in text:
        return text
    return _TERMINAL_ESCAPE_RE.sub("", text)


def remove_invisible(text: str) -> str:
    text = _INVISIBLE_RE.sub("", text)
    return _CONTROL_RE.sub(" ", text)


def nfkc_keep_zh_punct(text: str) -> str:
    """Apply NFKC (full-width letters and digits become ASCII), except on Chinese punctuation after Han."""
    if _KEEP_ZH_PUNCT_RE.search(text) is None:
        return unicodedata.normalize("NFKC", text)

    # re.split with one group alternates: text, kept punctuation, text, ...
    pieces = _KEEP_ZH_PUNCT_RE.split(text)
    for i in range(0, len(pieces), 2):
        pieces[i] = unicodedata.normalize("NFKC", pieces[i])
    return "".join(pieces)


def collapse_whitespace(text: str, join_han: bool = True) -> str:
    text = _SPACE_RE.sub(" ", text).strip()
    if join_han:
        text = _HAN_SPACE_RE.sub("", text)
    return text


def normalize_caption(text: str | None, config: CaptionConfig | None = None) -> str:
    """Return the canonical form of a caption; ``None`` and non-strings become ``""``."""
    if _fast is not None:
        return _fast.normalize_caption(text, config)
    return normalize_caption_python(text, config)


def normalize_caption_python(text: str | None, config: CaptionConfig | None = None) -> str:
    """Normalize a caption in pure Python. The compiled ``normalize_caption`` calls this for the rare slow steps."""
    if not isinstance(text, str) or not text:
        return ""
    config = config or DEFAULT_CONFIG

    text = text[: config.max_input_chars]
    if text.isascii() and text.isprintable() and "&" not in text and "<" not in text:
        # Printable ASCII (U+0020..U+007E) without entities or tags: only spaces can change.
        return " ".join(text.split())

    if _PRE_NFKC_RE.search(text) is None:
        # No entity, tag, mojibake hint, invisible or control character, and no whitespace, so
        # every step but NFKC leaves the text as it is. NFKC can still add a space (U+00A8 -> " \u0308").
        if unicodedata.is_normalized("NFKC", text):
            return text
        text = nfkc_keep_zh_punct(text)
        if _SPACE_RE.search(text) is None:
            return text
        return collapse_whitespace(text, join_han=config.join_han_spaces)

    # First, so that no later step receives a character that UTF-8 cannot encode.
    text = _SURROGATE_RE.sub("\ufffd", text)
    if config.strip_html:
        text = unescape_html(text)
        text = strip_tags(text)

    if config.fix_mojibake:
        text = repair_mojibake(text)

    # Before control characters become spaces, which would leave "[31m" and the like behind.
    text = strip_terminal_escapes(text)
    text = remove_invisible(text)
    if config.join_han_spaces:
        # Before NFKC, so full-width punctuation separated from Han by a space is still kept.
        text = _HAN_SPACE_RE.sub("", text)
    text = nfkc_keep_zh_punct(text)

    # NFKC can create new controls or spaces (U+3000 -> " "), so whitespace comes last.
    return collapse_whitespace(text, join_han=config.join_han_spaces)


DEFAULT_CONFIG = CaptionConfig()

# The compiled caption rules, or None when they are not built or switched off. lid, text_quality
# and captions use this module too, so a missing build logs one warning.
_fast = speedups.compiled("_caption_fast")

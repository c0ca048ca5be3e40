"""Caption quality rules: junk and boilerplate, length per language, symbols, repeats, blocklists.

Rules run on normalized captions (see ``text_normalize``). The first rule that fails comes back
as a ``QualityIssue``, and the pipeline turns it into a ``caption_filtered`` reject that names the
rule and its detail. Word lists and boilerplate patterns come from files, so a
run can replace them without code changes.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import ahocorasick

from bm6b.filters import text_normalize
from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.literal_gate import _ASCII_CASE_VARIANTS_RE, LiteralGate, _is_uncased
from bm6b.filters.text_normalize import HAN_CLASS

IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "gif", "webp", "bmp", "tif", "tiff", "heic", "avif", "svg")

_HAN_RE = re.compile(f"[{HAN_CLASS}]")
_LATIN_WORD_RE = re.compile(r"[A-Za-z0-9\u00c0-\u024f]+")
_LETTER_RE = re.compile(r"[^\W\d_]")
_URL_PATTERN = r"(?:https?://|www\.)\S+"
_URL_RE = re.compile(_URL_PATTERN, re.IGNORECASE)
_FILE_NAME_RE = re.compile(r"\.(?:" + "|".join(IMAGE_EXTENSIONS) + r")\s*$", re.IGNORECASE)
_CAMERA_NAME_RE = re.compile(r"^(?:IMG|DSC[NF]?|DCIM|PIC|PXL|MVIMG|VID|Screenshot|image)[_-]?\d[\w-]*$", re.IGNORECASE)
_SLUG_RE = re.compile(r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+){2,}$")
# Sentence punctuation does not count as special; every other non-letter, non-digit,
# non-space character (symbols, emoji, box drawing, stray brackets) does.
_SPECIAL_RE = re.compile(
    r"[^\w\s.,;:!?'\"()\-\u2010-\u2015\u2018\u2019\u201c\u201d\u2026\u00b7"
    "\u3001\u3002\uff0c\uff01\uff1f\uff1a\uff1b\uff08\uff09\u300a\u300b\u300c\u300d\u300e\u300f\u3010\u3011]"
)
_WORD_RE = re.compile(r"\w+")
_NON_HAN_RE = re.compile(f"[^{HAN_CLASS}]+")
# Separators that boilerplate removal leaves at either end, removed with str.strip. A regex
# "[...]+$" would retry at every position of a long run inside the text (quadratic time).
_EDGE_JUNK = " -\u2013\u2014|:,#/~*"
_IMAGE_SUFFIXES = tuple(f".{extension}" for extension in IMAGE_EXTENSIONS)

# Byte tables for the ASCII fast paths, derived from the regexes above so both paths agree.
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_ASCII_NOT_SPECIAL = bytes(c for c in range(128) if not _SPECIAL_RE.match(chr(c)))
_ASCII_NON_WORD = bytes(c for c in range(128) if not _WORD_RE.match(chr(c)))
_ASCII_NON_WORD_TO_SPACE = bytes.maketrans(_ASCII_NON_WORD, b" " * len(_ASCII_NON_WORD))


@dataclass(frozen=True)
class QualityIssue:
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"


def count_han(text: str) -> int:
    if text.isascii():
        return 0
    return len(_HAN_RE.findall(text))


def _han_profile(text: str) -> tuple[str, bool]:
    """Return the Han characters of a caption, and whether they are at least half of its letters."""
    if text.isascii():
        return "", False
    han = _NON_HAN_RE.sub("", text)
    if not han:
        return "", False
    if 2 * len(han) >= len(text) and han.isalpha():
        # Every Han character here is a letter and there are at most len(text) letters, so
        # counting the letters one by one (the slow part) cannot change the result.
        return han, True
    letters = len(_LETTER_RE.findall(text))
    return han, letters > 0 and 2 * len(han) >= letters


def zh_length(text: str) -> int:
    """Length of a Chinese caption: Han characters plus Latin or digit words ("iPhone 13 手机壳" is 5)."""
    return count_han(text) + len(_LATIN_WORD_RE.findall(text))


def en_words(text: str) -> list[str]:
    return text.split()


def is_han_text(text: str) -> bool:
    """True when Han characters are at least half of the letters (a zh-style length applies)."""
    return _han_profile(text)[1]


@functools.lru_cache(maxsize=32)
def _read_lines(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"failed to read caption list file {path!r}: {err}; check the list file options") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"caption list file {path!r} is not UTF-8 text ({err}); save it as UTF-8, one entry per line") from err

    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return tuple(lines)


@functools.lru_cache(maxsize=32)
def load_boilerplate(paths: tuple[str, ...]) -> re.Pattern[str] | None:
    patterns = [p for path in paths for p in _read_lines(path)]
    if not patterns:
        return None
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid boilerplate pattern {pattern!r}: {err}") from err
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)


@functools.lru_cache(maxsize=32)
def _boilerplate_gate(paths: tuple[str, ...]) -> LiteralGate:
    """Gate for the URL pattern together with the boilerplate patterns of ``paths``."""
    load_boilerplate(paths)  # raises ValueError naming an invalid pattern, which the gate's parser would not
    return LiteralGate([_URL_PATTERN, *(p for path in paths for p in _read_lines(path))])


@functools.lru_cache(maxsize=32)
def load_blocklist(language: str, paths: tuple[str, ...]) -> re.Pattern[str] | None:
    """Compile one list: zh terms match as substrings, other languages as whole words."""
    return _compile_terms(language, frozenset(t for path in paths for t in _read_lines(path)))


@functools.lru_cache(maxsize=1024)
def _compile_terms(language: str, terms: frozenset[str]) -> re.Pattern[str] | None:
    if not terms:
        return None
    # Longest first, so a match reports the longest term that starts at its position. Ties sort
    # alphabetically, so every process builds the same pattern.
    alternation = "|".join(re.escape(t) for t in sorted(terms, key=lambda t: (-len(t), t)))
    if language == "zh":
        return re.compile(alternation, re.IGNORECASE)
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)


@functools.lru_cache(maxsize=32)
def _term_automaton(paths: tuple[str, ...]) -> ahocorasick.Automaton | None:
    """Return an Aho-Corasick automaton of a list's lower-cased terms, each mapped to its original terms.

    Returns None when a term has a cased non-ASCII character, because str.lower then need not
    agree with re.IGNORECASE (see ``literal_gate``).
    """
    originals: dict[str, set[str]] = {}
    for path in paths:
        for term in _read_lines(path):
            if not all(ch.isascii() or _is_uncased(ch) for ch in term):
                return None
            originals.setdefault(term.lower(), set()).add(term)
    if not originals:
        return None
    automaton = ahocorasick.Automaton()
    for lowered, terms in originals.items():
        automaton.add_word(lowered, frozenset(terms))
    automaton.make_automaton()
    return automaton


def _blocklist_pattern(language: str, paths: tuple[str, ...], text: str) -> re.Pattern[str] | None:
    """Return a pattern that matches ``text`` exactly where the whole list's pattern does, or None if neither can.

    Python's re tries every term of an alternation at every position, so a list of 50,000 random
    terms took about 0.5 s of CPU per 4,000-character caption on a 2-vCPU VM. Only the terms whose
    lower-cased form occurs in the lower-cased text can match, and one Aho-Corasick pass finds them.
    """
    automaton = _term_automaton(paths)
    if automaton is None or (not text.isascii() and _ASCII_CASE_VARIANTS_RE.search(text) is not None):
        return load_blocklist(language, paths)
    found = frozenset(term for _, terms in automaton.iter(text.lower()) for term in terms)
    return _compile_terms(language, found)


@functools.lru_cache(maxsize=32)
def _blocklist_gate(lists: tuple[tuple[str, tuple[str, ...]], ...]) -> LiteralGate:
    """Gate for every blocklist of a config, given as (language, paths) pairs."""
    return LiteralGate(re.escape(t) for _, paths in lists for path in paths for t in _read_lines(path))


def strip_boilerplate(text: str, config: CaptionConfig) -> str:
    """Remove stock-photo phrases and URLs, then the separators they leave at either end."""
    paths = tuple(config.boilerplate_files)
    if not _boilerplate_gate(paths).may_match(text):
        return text
    pattern = load_boilerplate(paths)
    cleaned = _URL_RE.sub(" ", text)
    if pattern is not None:
        cleaned = pattern.sub(" ", cleaned)
    if cleaned == text:
        return text
    # After the join, the only whitespace left is the single space that _EDGE_JUNK contains.
    return " ".join(cleaned.split()).strip(_EDGE_JUNK)


def junk_issue(text: str) -> QualityIssue | None:
    """Detect captions that are a URL, a file name, a URL slug, or have no letters at all."""
    if _fast is not None and type(text) is str:
        return _fast.junk_issue(text)
    return junk_issue_python(text)


def junk_issue_python(text: str) -> QualityIssue | None:
    """Run ``junk_issue`` in pure Python. The compiled one calls this for text with U+0130, U+0131, U+017F or U+212A."""
    stripped = text.strip()
    if stripped.isascii() and " " in stripped:
        # A URL, a camera file name and a slug contain no whitespace, and in ASCII text the file
        # name pattern is the same as an image suffix at the end.
        if stripped.lower().endswith(_IMAGE_SUFFIXES):
            return QualityIssue("file_name", "the caption is an image file name")
        if not _LETTER_RE.search(stripped):
            return QualityIssue("no_letters", "the caption has only digits, spaces or symbols")
        return None

    if _URL_RE.fullmatch(stripped):
        return QualityIssue("url", "the caption is a URL")
    if _FILE_NAME_RE.search(stripped) or _CAMERA_NAME_RE.match(stripped):
        return QualityIssue("file_name", "the caption is an image file name")
    if _SLUG_RE.match(stripped) and not stripped.isdigit():
        return QualityIssue("slug", "the caption is a URL slug of words joined by - or _")
    if not _LETTER_RE.search(stripped):
        return QualityIssue("no_letters", "the caption has only digits, spaces or symbols")
    return None


def length_issue(text: str, language: str, config: CaptionConfig) -> QualityIssue | None:
    han, han_text = _han_profile(text)
    return _length_issue(text, language, config, han, han_text)


def _length_issue(text: str, language: str, config: CaptionConfig, han: str, han_text: bool) -> QualityIssue | None:
    if language in config.zh_labels or (language != "en" and han_text):
        n = len(han) + len(_LATIN_WORD_RE.findall(text))
        if n < config.min_zh_chars:
            return QualityIssue("too_short", f"{n} Chinese characters and words < {config.min_zh_chars}")
        if n > config.max_zh_chars:
            return QualityIssue("too_long", f"{n} Chinese characters and words > {config.max_zh_chars}")
        return None

    words = en_words(text)
    chars = len("".join(words))
    if len(words) < config.min_en_words:
        return QualityIssue("too_short", f"{len(words)} words < {config.min_en_words}")
    if chars < config.min_en_chars:
        return QualityIssue("too_short", f"{chars} characters < {config.min_en_chars}")
    if len(words) > config.max_en_words:
        return QualityIssue("too_long", f"{len(words)} words > {config.max_en_words}")
    return None


def special_char_ratio(text: str) -> float:
    if text.isascii():
        data = text.encode("ascii")
        nonspace = len(data.translate(None, _ASCII_SPACE))
        if nonspace == 0:
            return 0.0
        return len(data.translate(None, _ASCII_NOT_SPECIAL)) / nonspace

    nonspace = len("".join(text.split()))
    if nonspace == 0:
        return 0.0
    return len(_SPECIAL_RE.findall(text)) / nonspace


def repeated_word_ratio(text: str) -> tuple[float, int]:
    """Share of tokens that repeat an earlier token; Han text is tokenized into character bigrams."""
    han, han_text = _han_profile(text)
    return _repeated_word_ratio(text, han, han_text)


def _repeated_word_ratio(text: str, han: str, han_text: bool) -> tuple[float, int]:
    if han_text:
        # The bigrams han[i:i+2], joined by map from the two shifted strings without a Python loop.
        tokens = list(map(operator.add, han, han[1:]))
    elif text.isascii():
        # Same tokens as _WORD_RE.findall: in ASCII, \w is [A-Za-z0-9_].
        tokens = text.encode("ascii").lower().translate(_ASCII_NON_WORD_TO_SPACE).split()
    else:
        tokens = _WORD_RE.findall(text.lower())
    if not tokens:
        return 0.0, 0
    return 1.0 - len(set(tokens)) / len(tokens), len(tokens)


@functools.lru_cache(maxsize=8)
def _char_run_pattern(max_run: int) -> re.Pattern[str]:
    return re.compile(rf"([^\d\s])\1{{{max_run},}}")


def _may_have_char_run(text: str, max_run: int) -> bool:
    """Return False only when no character repeats more than ``max_run`` times in a row (a cheap pre-check).

    A run of max_run + 1 equal characters needs max_run equal neighbours. For ASCII text, the XOR
    of the text with itself shifted by one byte is zero exactly where neighbours are equal, so the
    run shows as max_run zero bytes in a row. Other text needs max_run repeated characters.
    """
    if len(text) <= max_run:
        return False
    if text.isascii():
        data = text.encode("ascii")
        neighbours = int.from_bytes(data[1:], "big") ^ int.from_bytes(data[:-1], "big")
        return bytes(max_run) in neighbours.to_bytes(len(data) - 1, "big")
    return len(text) - len(set(text)) >= max_run


def repetition_issue(text: str, config: CaptionConfig) -> QualityIssue | None:
    han, han_text = _han_profile(text)
    return _repetition_issue(text, config, han, han_text)


def _repetition_issue(text: str, config: CaptionConfig, han: str, han_text: bool) -> QualityIssue | None:
    if _may_have_char_run(text, config.max_char_run):
        run = _char_run_pattern(config.max_char_run).search(text)
        if run:
            return QualityIssue("char_run", f"{run.group(0)[:20]!r} repeats one character more than {config.max_char_run} times")

    if han_text and len(han) >= 2:
        # Han text has len(han) - 1 bigrams. Bigrams that start with different characters differ,
        # so the distinct first characters bound the distinct bigrams from below, and the repeated
        # share from above, without building the bigrams.
        n_tokens = len(han) - 1
        if n_tokens < config.min_words_for_repeat_check:
            return None
        if 1.0 - len(set(han[:-1])) / n_tokens <= config.max_repeated_word_ratio:
            return None

    ratio, n_tokens = _repeated_word_ratio(text, han, han_text)
    if n_tokens >= config.min_words_for_repeat_check and ratio > config.max_repeated_word_ratio:
        return QualityIssue("repeated_words", f"{ratio:.2f} of {n_tokens} tokens repeat > {config.max_repeated_word_ratio}")
    return None


def _blocklist_lists_and_gate(config: CaptionConfig) -> tuple[tuple, LiteralGate]:
    """Return the blocklists of a config as (language, paths) pairs, and their gate."""
    lists = tuple(config.blocklist_files.items())
    try:
        return lists, _blocklist_gate(lists)
    except TypeError:
        # The cache key must be hashable, so paths given as a list become tuples.
        lists = tuple((language, tuple(paths)) for language, paths in lists)
        return lists, _blocklist_gate(lists)


def _blocklist_gate_of(config: CaptionConfig) -> LiteralGate:
    return _blocklist_lists_and_gate(config)[1]


def blocklist_issue(text: str, config: CaptionConfig) -> QualityIssue | None:
    lists, gate = _blocklist_lists_and_gate(config)
    if not gate.may_match(text):
        return None
    for language, paths in lists:
        pattern = _blocklist_pattern(language, tuple(paths), text)
        if pattern is None:
            continue
        match = pattern.search(text)
        if match:
            return QualityIssue("blocklist", f"matches {match.group(0)!r} from the {language} blocklist")
    return None


def check_caption(text: str, language: str, config: CaptionConfig,
                  boilerplate_stripped: bool = False) -> tuple[str, QualityIssue | None]:
    """Run every quality rule on a normalized caption.

    ``language`` is the lid.176 label (zh, yue, wuu, en, ...). Returns the caption with
    boilerplate removed and the first failing rule, or ``None`` when the caption passes. Pass
    ``boilerplate_stripped`` when ``strip_boilerplate`` already ran on the text.
    """
    if not text:
        return text, QualityIssue("empty", "no text left after normalization")

    issue = junk_issue(text)
    if issue:
        return text, issue

    if config.strip_boilerplate and not boilerplate_stripped:
        text = strip_boilerplate(text, config)
        if not text:
            return text, QualityIssue("boilerplate", "only boilerplate phrases and URLs")

    return text, content_issue(text, language, config)


def content_issue(text: str, language: str, config: CaptionConfig) -> QualityIssue | None:
    """Run the rules that follow junk detection and boilerplate removal in ``check_caption``.

    They are, in order: blocklists, length, special characters, repeated characters and words.
    Returns the first failing rule, or ``None``.
    """
    if _fast is not None and type(text) is str and type(language) is str:
        return _fast.content_issue(text, language, config)
    issue = blocklist_issue(text, config)
    if issue:
        return issue

    # The Han characters feed both the length and the repeated-word rule.
    han, han_text = _han_profile(text)
    issue = _length_issue(text, language, config, han, han_text)
    if issue:
        return issue

    ratio = special_char_ratio(text)
    if ratio > config.max_special_char_ratio:
        return QualityIssue("special_chars", f"special-character ratio {ratio:.2f} > {config.max_special_char_ratio}")

    return _repetition_issue(text, config, han, han_text)


# The compiled rules, or None. text_normalize imports them once for every caption module (see speedups).
_fast = text_normalize._fast

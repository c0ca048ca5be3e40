"""Caption duplicate keys: a normalized exact key and MinHash LSH bands over n-gram shingles.

The exact key folds away differences that do not change the meaning of a caption: Unicode NFKC
(which also folds full-width Latin letters and digits to half width), traditional to simplified
Chinese with OpenCC ``t2s``, lower case, and every punctuation, symbol and space character
removed. ``"這是一隻貓！"`` and ``"这是一只猫"`` share one key.

Near duplicates use MinHash over shingles of the normalized text: character n-grams for
Chinese, because Chinese has no spaces and splitting on whitespace would turn a whole caption
into one token; word n-grams for English. LSH bands (sized for 99% recall at the threshold)
propose candidates and the exact Jaccard similarity of the shingle sets decides.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import unicodedata
from typing import Iterable

import numpy as np

from bm6b.dedup.config import check_caption_threshold

LANGUAGES = ("zh", "en")

# Unicode general categories removed from the exact key: punctuation, symbols, separators.
_DROP_CATEGORIES = ("P", "S", "Z", "C")
# datasketch 2.x hashing scheme (32-bit SHA-1 values, affine permutations), its default.
MINHASH_SCHEME = "affine32"
_WORD_RE = re.compile(r"\w+", re.UNICODE)


@functools.lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def fold_text(text: str) -> str:
    """NFKC, traditional to simplified Chinese and lower case; punctuation and spaces kept."""
    text = unicodedata.normalize("NFKC", text)
    text = _t2s().convert(text)
    return text.lower()


def exact_key(text: str | None) -> str:
    """Return the normalized exact-dedup key of a caption; empty when nothing is left."""
    if not text:
        return ""
    folded = fold_text(text)
    return "".join(ch for ch in folded if not unicodedata.category(ch).startswith(_DROP_CATEGORIES))


@dataclasses.dataclass(frozen=True)
class NearConfig:
    """MinHash LSH settings for near-duplicate captions."""

    threshold: float = 0.9  # minimum Jaccard similarity of the shingle sets
    num_perm: int = 128
    zh_ngram: int = 3  # characters per Chinese shingle
    en_ngram: int = 2  # words per English shingle
    seed: int = 1

    def __post_init__(self):
        check_caption_threshold(self.threshold)


def shingles(text: str | None, language: str, config: NearConfig = NearConfig()) -> frozenset[str]:
    """Return the shingle set: character n-grams of the exact key for zh, word n-grams for en.

    A text shorter than one n-gram becomes a single shingle of the whole text, so short
    captions only match captions with the same exact key.
    """
    if not text:
        return frozenset()
    if language == "zh":
        units: list[str] = list(exact_key(text))
        size = config.zh_ngram
        join = ""
    elif language == "en":
        units = _WORD_RE.findall(fold_text(text))
        size = config.en_ngram
        join = " "
    else:
        raise ValueError(f"unknown caption language {language!r}; expected 'zh' or 'en'")
    if not units:
        return frozenset()
    if len(units) <= size:
        return frozenset([join.join(units)])
    return frozenset(join.join(units[i : i + size]) for i in range(len(units) - size + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


@functools.lru_cache(maxsize=8)
def lsh_layout(threshold: float, num_perm: int, target_recall: float = 0.99) -> tuple[int, int]:
    """Return (bands, rows): the most rows per band that still find a pair at ``threshold`` with ``target_recall``.

    A pair of Jaccard similarity J shares at least one band with probability
    ``1 - (1 - J ** rows) ** bands``. Candidates are verified exactly afterwards, so the layout
    favors recall; datasketch's own choice (5 bands of 25 rows at 0.9) finds such a pair only
    31% of the time.
    """
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= target_recall:
            return bands, rows
    return num_perm, 1


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME).permutations


def minhash(shingle_set: Iterable[str], config: NearConfig = NearConfig()) -> np.ndarray:
    """Return the datasketch MinHash signature (uint64 array of ``num_perm``) of a shingle set."""
    from datasketch import MinHash

    signature = MinHash(
        num_perm=config.num_perm,
        seed=config.seed,
        permutations=_permutations(config.num_perm, config.seed),
        scheme=MINHASH_SCHEME,
    )
    signature.update_batch([s.encode("utf-8") for s in shingle_set])
    return signature.hashvalues


def lsh_band_keys(signature: np.ndarray, config: NearConfig = NearConfig()) -> list[str]:
    """Return one key per LSH band: the band index and a digest of that band's MinHash rows."""
    bands, rows = lsh_layout(config.threshold, config.num_perm)
    keys = []
    for band in range(bands):
        chunk = np.ascontiguousarray(signature[band * rows : (band + 1) * rows], dtype="<u8")
        keys.append(f"{band}:{hashlib.blake2b(chunk.tobytes(), digest_size=8).hexdigest()}")
    return keys


def near_duplicate_forest(members: list[tuple[str, frozenset[str]]], threshold: float) -> list[tuple[str, str]]:
    """Return edges that link each member to every cluster whose first member it matches.

    ``members`` are (node, shingles) of one LSH band group. Each member is compared with the
    first member of each cluster found so far, not with every member, so a group of n members
    in k clusters costs n * k Jaccard computations. Members of a band group share
    ``rows`` MinHash values, so k is usually small.

    NOTE: templated captions that differ in one token can share a band yet stay below the
    threshold, and then k grows with n: 8,000 such captions in one group took 49 s of CPU on a
    2-vCPU VM. No cap on group size bounds this yet.
    """
    from bm6b.dedup.phash import UnionFind

    forest = UnionFind(len(members))
    heads: list[int] = []
    edges = []
    for i, (node, shingle_set) in enumerate(members):
        matched = False
        for head in heads:
            if forest.find(head) == forest.find(i):
                continue
            if jaccard(members[head][1], shingle_set) >= threshold:
                forest.union(head, i)
                edges.append((members[head][0], node))
                matched = True
        if not matched:
            heads.append(i)
    return edges

"""Which sample of a duplicate cluster is kept: the representative rule, as a sortable node id.

Preference order, first difference wins:

1. the sample has both a Chinese and an English caption;
2. the larger original image (``orig_width * orig_height``, else ``width * height``);
3. the higher CLIP score, the larger of ``clip_score_zh`` and ``clip_score_en``. A sample
   without a score ranks below any scored one. Inside ``curate`` no sample has a score yet,
   because dedup runs before scoring;
4. the smaller ``key``.

``node_id`` encodes that order in a string, so the lexicographically smallest node of a
cluster is its representative. The distributed connected components propagate the minimum
node, which then is the kept sample directly.

A node id is ``<24-digit rank prefix>\0<key>\0<extra>``. NUL sorts below every other
character, so a key that is a prefix of another ("a", "a0") sorts first as in ``keep_rank``,
and the key is read back whole even when it contains the separator of other formats ("|").
"""

from __future__ import annotations

import math
from typing import Any

_MAX_PIXELS = 10**13 - 1
_CLIP_SCALE = 10**8
_CLIP_SLOTS = 10**10 - 1
# NUL: the smallest character, so "key" + SEPARATOR sorts before any longer key it starts.
SEPARATOR = "\0"
_PREFIX_WIDTH = 1 + 13 + 10


def _clip_score(record: dict[str, Any]) -> float | None:
    scores = [s for s in (record.get("clip_score_zh"), record.get("clip_score_en")) if s is not None]
    scores = [s for s in scores if not math.isnan(s)]
    return max(scores) if scores else None


def _pixels(record: dict[str, Any]) -> int:
    width = record.get("orig_width") or record.get("width") or 0
    height = record.get("orig_height") or record.get("height") or 0
    return min(int(width) * int(height), _MAX_PIXELS)


def keep_rank(record: dict[str, Any]) -> tuple:
    """Sort key of the representative rule; the smallest value is kept."""
    both = bool(record.get("caption_zh")) and bool(record.get("caption_en"))
    score = _clip_score(record)
    return (not both, -_pixels(record), -score if score is not None else math.inf, record["key"])


def node_id(record: dict[str, Any], extra: str = "") -> str:
    """Return a string whose lexicographic order is the representative rule, ending in ``\\0key\\0extra``.

    ``extra`` must not contain NUL. A key that contains NUL can rank out of order against the
    key that ends at that NUL.
    """
    both = bool(record.get("caption_zh")) and bool(record.get("caption_en"))
    score = _clip_score(record)
    # CLIP cosine scores lie in [-1, 1]; higher must sort first, and "no score" sorts last.
    if score is None:
        clip_slot = _CLIP_SLOTS
    else:
        clip_slot = min(_CLIP_SLOTS - 1, max(0, round((1.0 - max(-1.0, min(1.0, score))) * _CLIP_SCALE)))
    prefix = f"{0 if both else 1}{_MAX_PIXELS - _pixels(record):013d}{clip_slot:010d}"
    return SEPARATOR.join((prefix, record["key"], extra))


def node_key(node: str) -> str:
    """Return the sample key inside a node id."""
    return node[_PREFIX_WIDTH + 1 :].rpartition(SEPARATOR)[0]


def node_extra(node: str) -> str:
    """Return the ``extra`` text of a node id ("" when none was given)."""
    return node.rpartition(SEPARATOR)[2]

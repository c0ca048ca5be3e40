"""Deduplication and decontamination: URL, sha256, near-duplicate pHash, captions, eval sets.

The PTransforms load on first use, so ``bm6b.dedup.cli`` and ``bm6b.dedup.config`` import
without Apache Beam.
"""

from bm6b.dedup.config import DedupConfig

_TRANSFORMS = (
    "DedupCaptions",
    "DedupExactImages",
    "DedupNearImages",
    "DedupUrls",
    "Decontaminate",
    "apply_dedup_steps",
    "dedup_steps",
)

__all__ = ["DedupConfig", *_TRANSFORMS]


def __getattr__(name):
    if name in _TRANSFORMS:
        from bm6b.dedup import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module 'bm6b.dedup' has no attribute {name!r}")

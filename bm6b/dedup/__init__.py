"""Deduplication and decontamination: URL, sha256, near-duplicate pHash, captions, eval sets."""

from bm6b.dedup.transforms import (
    DedupCaptions,
    DedupConfig,
    DedupExactImages,
    DedupNearImages,
    DedupUrls,
    Decontaminate,
    apply_dedup_steps,
    dedup_steps,
)

__all__ = [
    "DedupCaptions",
    "DedupConfig",
    "DedupExactImages",
    "DedupNearImages",
    "DedupUrls",
    "Decontaminate",
    "apply_dedup_steps",
    "dedup_steps",
]

"""Settings of the dedup steps, kept free of Beam imports so the command line loads fast."""

from __future__ import annotations

import dataclasses

# Chosen on the near-duplicate benchmark over 1,000 real photos (BENCHMARKS.md,
# "Deduplication"): the largest even radius with no false merge among 8,000 originals and copies.
DEFAULT_RADIUS = 6
DEFAULT_COMPONENT_ROUNDS = 8


def check_caption_threshold(threshold: float) -> None:
    """Raise ValueError unless 0 < ``threshold`` <= 1 (NaN fails too)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"invalid caption dedup threshold {threshold}: expected a Jaccard similarity above 0 and at most 1"
        )


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Settings of the dedup steps that run after the exact sha256 dedup."""

    urls: bool = True  # one sample per normalized URL, before download
    near_images: bool = True
    radius: int = DEFAULT_RADIUS  # pHash Hamming radius in bits, inclusive
    # "pigeonhole" (exact), "sampled" (bit-sampling LSH) or "auto", which picks one of them
    # from the number of pHash codes (bm6b.dedup.phash.make_scheme).
    candidates: str = "auto"
    sampled_bits: int | None = None  # bits per sampled table; None: derived from the number of pHash codes
    captions: bool = True
    caption_near: bool = True  # MinHash LSH near duplicates, besides the exact key
    caption_threshold: float = 0.9  # Jaccard similarity of the shingle sets
    eval_sets: tuple[str, ...] = ()  # folders or manifests, optionally NAME=PATH
    components_rounds: int = DEFAULT_COMPONENT_ROUNDS

    def __post_init__(self):
        check_caption_threshold(self.caption_threshold)

"""``bm6b dedup``, and the dedup options shared with ``bm6b curate``."""

from __future__ import annotations

import argparse

from bm6b.dedup.config import DEFAULT_COMPONENT_ROUNDS, DEFAULT_RADIUS, DedupConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_dedup_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the "dedup" argument group (used by ``bm6b curate``, ``bm6b demo`` and ``bm6b dedup``)."""
    group = parser.add_argument_group(
        "dedup",
        "Exact dedup by normalized URL (before download) and image sha256 always runs; the steps below run "
        "after it, before CLIP scoring.",
    )
    group.add_argument("--no-url-dedup", dest="url_dedup", action="store_false",
                       help="keep every row even when rows share a normalized URL")
    group.add_argument("--near-dup-radius", type=int, default=DEFAULT_RADIUS, metavar="BITS",
                       help=f"pHash Hamming radius, inclusive, for near-duplicate images and eval images "
                       f"(default: {DEFAULT_RADIUS})")
    group.add_argument("--no-near-dup-images", dest="near_dup_images", action="store_false",
                       help="skip near-duplicate image dedup")
    group.add_argument("--near-dup-candidates", choices=["auto", "pigeonhole", "sampled"], default="auto",
                       help="candidate generation: pigeonhole bands (exact, work grows with the square of the "
                       "distinct pHash count), bit-sampling LSH tables (99%% recall at the radius, work about N^1.2), "
                       "or auto: pigeonhole unless its estimated work exceeds 2x that of sampled, which at radius 6 "
                       "happens past 500,000 to 700,000 distinct pHashes (default: auto)")
    group.add_argument("--near-dup-table-bits", type=int, default=None, metavar="BITS",
                       help="bits per table of the sampled scheme (default: log2 of the distinct pHash count, rounded, + 2)")
    group.add_argument("--no-caption-dedup", dest="caption_dedup", action="store_false",
                       help="skip caption dedup (exact and near)")
    group.add_argument("--no-caption-near-dup", dest="caption_near_dup", action="store_false",
                       help="caption dedup by the normalized exact key only, without MinHash LSH")
    group.add_argument("--caption-dup-threshold", type=float, default=DedupConfig.caption_threshold,
                       metavar="JACCARD",
                       help="Jaccard similarity of caption n-gram sets that counts as a near duplicate (default: 0.9)")
    group.add_argument("--eval-set", action="append", default=[], metavar="[NAME=]PATH",
                       help="evaluation set to decontaminate against: an image folder, or a .jsonl/.csv/.tsv "
                       "manifest with image and caption columns (repeatable)")
    group.add_argument("--components-rounds", type=int, default=DEFAULT_COMPONENT_ROUNDS,
                       help="large-star/small-star round pairs of the connected components (default: 8)")


def dedup_config_from_args(args: argparse.Namespace) -> DedupConfig:
    """Build the DedupConfig of a run; raise ValueError for options that would be ignored."""
    if args.near_dup_table_bits is not None and args.near_dup_candidates != "sampled":
        # Only the sampled scheme reads the bits; auto derives its own from the pHash count.
        raise ValueError(f"--near-dup-table-bits {args.near_dup_table_bits} applies only to "
                         f"--near-dup-candidates sampled, not {args.near_dup_candidates}; "
                         "add --near-dup-candidates sampled or drop --near-dup-table-bits")
    return DedupConfig(
        urls=args.url_dedup,
        near_images=args.near_dup_images,
        radius=args.near_dup_radius,
        candidates=args.near_dup_candidates,
        sampled_bits=args.near_dup_table_bits,
        captions=args.caption_dedup,
        caption_near=args.caption_near_dup,
        caption_threshold=args.caption_dup_threshold,
        eval_sets=tuple(args.eval_set),
        components_rounds=args.components_rounds,
    )


def run_dedup_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    from bm6b.dedup.run import run_dedup
    from bm6b.pipelines.stats import format_funnel

    # bm6b.cli.main turns a FileNotFoundError or ValueError into a one-line error and exit code 2.
    stats = run_dedup(args.input, args.output, dedup_config_from_args(args), beam_args,
                      samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
    print(format_funnel(stats))
    print(f"shards, rejects and stats.json are in {args.output}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dedup",
        help="deduplicate and decontaminate existing bm6b shards into a new folder",
        description="Read the shards of a curate output folder, run URL, sha256, eval-set, near-duplicate image "
        "and caption dedup on them, and write new shards with their rejects and stats. Options this command "
        "does not know are passed to Apache Beam; the default runner is the in-process FnApiRunner.",
    )
    parser.add_argument("input", help="folder with NNNNN.parquet + NNNNN.tar shards (local path or gs://...)")
    parser.add_argument("--output", "-o", required=True, help="output folder; must differ from the input")
    parser.add_argument("--samples-per-shard", type=_positive_int, default=10_000,
                        help="samples per output shard, at least 1 (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    add_dedup_arguments(parser)
    parser.set_defaults(func=run_dedup_command, accepts_extra=True)

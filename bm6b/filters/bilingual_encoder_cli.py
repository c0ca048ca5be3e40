"""The ``train-text-encoder`` subcommand of ``bm6b``: train a bilingual caption encoder from a TSV."""

from __future__ import annotations

import argparse
import logging
import pathlib

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-text-encoder",
        help="train a zh/en caption encoder for the translate-check embedding sub-score",
        description="Train a bilingual caption encoder on parallel captions and save it as .npz. Use the "
                    "file as --translate-embedding-model (or CaptionConfig.embedding_model).",
    )
    parser.add_argument("--pairs", required=True, type=pathlib.Path,
                        help="UTF-8 TSV without a header, one pair per row: group_id, en, zh. Rows that share a "
                             "group_id (the captions of one image) are hard negatives for each other")
    parser.add_argument("--output", "-o", required=True, type=pathlib.Path, help="encoder file to write (.npz)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the pairs (default: %(default)s)")
    parser.add_argument("--groups-per-batch", type=int, default=64,
                        help="groups per training batch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the SparseAdam optimizer (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="softmax temperature of the contrastive loss (default: %(default)s)")
    parser.add_argument("--zh-max-ngram", type=int, default=2,
                        help="longest Chinese character n-gram used as a feature, 1 to 4 (default: %(default)s)")
    parser.add_argument("--buckets", type=int, default=1 << 20,
                        help="hash buckets per language (default: %(default)s)")
    parser.add_argument("--no-en-bigrams", action="store_true", help="use English word stems without stem bigrams")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batch order (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bm6b.filters.bilingual_encoder import FeatureSettings, TrainSettings, read_pairs_tsv, train_encoder

    if not args.pairs.is_file():
        raise FileNotFoundError(f"pairs file not found: {args.pairs}")
    if args.output.is_dir():
        raise FileExistsError(f"--output {args.output} is an existing folder; give the path of the .npz file to write")
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")
    if not args.output.parent.is_dir():
        raise NotADirectoryError(f"output folder not found: {args.output.parent}")
    features = FeatureSettings(buckets=args.buckets, zh_max_ngram=args.zh_max_ngram, en_bigrams=not args.no_en_bigrams)
    train = TrainSettings(dim=args.dim, epochs=args.epochs, groups_per_batch=args.groups_per_batch,
                          learning_rate=args.lr, temperature=args.temperature, seed=args.seed)
    features.validate()
    train.validate()
    pairs = read_pairs_tsv(args.pairs)
    encoder = train_encoder(pairs, features, train, progress=not args.no_progress)
    encoder.save(args.output)
    logger.info("wrote %s (%d bytes)", args.output, args.output.stat().st_size)
    return 0

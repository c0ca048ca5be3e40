"""The ``train``, ``eval`` and ``tokenizer`` subcommands of ``bm6b``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", nargs="+", required=True, help="training tars: paths, globs or brace patterns such as 'DIR/{00000..00009}.tar'")
    parser.add_argument("--output", "-o", required=True, help="run folder for checkpoints (last.pt) and metrics.jsonl")
    parser.add_argument("--model", default="bm6b-tiny", help="open_clip model config, e.g. bm6b-tiny, ViT-B-16 (default: bm6b-tiny)")
    parser.add_argument("--tokenizer", default="simple", help="'simple' (open_clip's SimpleTokenizer) or a JSON file from `bm6b tokenizer train`")
    parser.add_argument("--context-length", type=int, default=77, help="text tokens per caption, including start and end tokens (default: 77)")
    parser.add_argument("--batch-size", type=int, default=64, help="image-text pairs per rank per micro-batch (default: 64)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step, accumulated with GradCache (default: 1)")
    parser.add_argument("--itc-group-size", type=int, default=None, help="ranks per contrastive-loss group k; must divide the world size (default: ranks per node; 0 = all ranks, the exact global loss)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default: 1000)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: 5e-4)")
    parser.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay (default: 0)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps (default: 100)")
    parser.add_argument("--weight-decay", type=float, default=0.2, help="AdamW weight decay on weight matrices (default: 0.2)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm, 0 disables clipping (default: 1.0)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="autocast precision of the encoders (default: auto = bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute encoder activations in backward to save memory")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes per rank (default: 2)")
    parser.add_argument("--text-policy", choices=("random", "zh", "en", "both"), default="random", help="which captions become text views: one random caption, only zh, only en, or both as separate pairs (default: random)")
    parser.add_argument("--no-mask-duplicates", action="store_true", help="treat pairs of a step that share an image (same sha256, e.g. its other captions) as negatives, as plain CLIP does; by default they are left out of each other's softmax")
    parser.add_argument("--crop-scale-min", type=float, default=0.9, help="smallest image area fraction of the training random-resized crop (default: 0.9, open_clip's)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="samples in each worker's shuffle buffer (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentation (default: 0)")
    parser.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (default: 500)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between metrics lines (default: 10)")
    parser.add_argument("--resume", default="auto", help="'auto' (resume from OUTPUT/last.pt when present), 'none', or a checkpoint path")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace):
    from bm6b.train.trainer import TrainConfig

    for name in ("batch_size", "accum", "steps", "log_every", "save_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.crop_scale_min <= 1:
        raise SystemExit(f"error: --crop-scale-min must be in (0, 1], got {args.crop_scale_min}")
    if args.workers < 0:
        raise SystemExit(f"error: --workers must be 0 or more, got {args.workers}")
    group_size = args.itc_group_size
    return TrainConfig(
        shards=args.shards,
        output=args.output,
        model=args.model,
        tokenizer=args.tokenizer,
        context_length=args.context_length,
        batch_size=args.batch_size,
        accum=args.accum,
        itc_group_size=None if group_size is None else (group_size or _world_size()),
        steps=args.steps,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        precision=args.precision,
        grad_checkpointing=args.grad_checkpointing,
        workers=args.workers,
        text_policy=args.text_policy,
        mask_duplicates=not args.no_mask_duplicates,
        crop_scale_min=args.crop_scale_min,
        shuffle_buffer=args.shuffle_buffer,
        seed=args.seed,
        save_every=args.save_every,
        log_every=args.log_every,
        resume=args.resume,
        device=args.device,
        progress=not args.no_progress,
    )


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def run_train(args: argparse.Namespace) -> int:
    from bm6b.train.trainer import train

    record = train(config_from_args(args))
    if record:
        logger.info("finished: %s", json.dumps(record))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from bm6b.train.evaluate import evaluate, format_results, load_for_eval, save_results

    if args.checkpoint is None and not args.untrained:
        raise SystemExit("error: pass --checkpoint, or --untrained to evaluate a randomly initialized model")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    model, preprocess, tokenizer = load_for_eval(
        None if args.untrained else args.checkpoint, args.model, args.tokenizer, device, seed=args.seed
    )
    results = evaluate(model, preprocess, tokenizer, args.shards, device=device, batch_size=args.batch_size)
    print(format_results(results))
    if args.output:
        save_results(results, args.output)
    return 0


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from bm6b.train.data import expand_shards, read_samples
    from bm6b.train.tokenizer import train_bilingual_tokenizer

    def captions():
        for sample in read_samples(expand_shards(args.shards)):
            for lang in ("zh", "en"):
                raw = sample.get(f"{lang}.txt")
                if raw:
                    yield raw.decode("utf-8", errors="replace")

    summary = train_bilingual_tokenizer(captions(), args.vocab_size, args.output, args.min_frequency)
    print(json.dumps(summary))
    return 0


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="contrastive pretraining of an open_clip model on bm6b shards",
        description="Train with the grouped ITC loss (features gathered only inside groups of k ranks, "
        "optionally accumulated over micro-batches with GradCache). For several processes run "
        "`torchrun --nproc-per-node N -m bm6b.train ...` with the same options.",
    )
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    evaluation = subparsers.add_parser(
        "eval",
        help="zero-shot retrieval R@1/5/10 on held-out shards, separately for zh and en",
        description="Embed every image and caption of the held-out shards and report image-to-text and "
        "text-to-image recall at 1, 5 and 10, once with the zh captions and once with the en captions. "
        "Captions of the same photo (same sha256) count as one image.",
    )
    evaluation.add_argument("--shards", nargs="+", required=True, help="held-out tars: paths, globs or brace patterns")
    evaluation.add_argument("--checkpoint", help="checkpoint written by `bm6b train` (its model and tokenizer are used)")
    evaluation.add_argument("--untrained", action="store_true", help="evaluate a randomly initialized --model instead, as a baseline")
    evaluation.add_argument("--model", default="bm6b-tiny", help="model config for --untrained (default: bm6b-tiny)")
    evaluation.add_argument("--tokenizer", default="simple", help="tokenizer for --untrained (default: simple)")
    evaluation.add_argument("--seed", type=int, default=0, help="initialization seed for --untrained (default: 0)")
    evaluation.add_argument("--batch-size", type=int, default=128, help="images or captions per forward pass (default: 128)")
    evaluation.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    evaluation.add_argument("--output", help="write the results as JSON to this file")
    evaluation.set_defaults(func=run_eval)

    tokenizer = subparsers.add_parser("tokenizer", help="train the bilingual BPE tokenizer")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tokenizer_train = tokenizer_commands.add_parser(
        "train", help="learn a BPE vocabulary from the zh and en captions of shards (tokenizers library)"
    )
    tokenizer_train.add_argument("--shards", nargs="+", required=True, help="tars whose captions to learn from")
    tokenizer_train.add_argument("--output", "-o", required=True, help="tokenizer JSON file to write")
    tokenizer_train.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size including special tokens (default: 32000)")
    tokenizer_train.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    tokenizer_train.set_defaults(func=run_tokenizer_train)
    tokenizer.set_defaults(func=lambda args: tokenizer.print_help(sys.stderr) or 2)

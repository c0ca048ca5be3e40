"""``python -m bm6b.train`` (and ``torchrun ... -m bm6b.train``): the training entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bm6b.train.cli import add_train_arguments, run_train


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m bm6b.train", description="Contrastive pretraining on bm6b shards.")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    return run_train(args)


if __name__ == "__main__":
    sys.exit(main())

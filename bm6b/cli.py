"""The ``bm6b`` command line: one subcommand per module.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` (and, for commands that pass
options through to Beam, the list of arguments argparse did not recognise).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that provide subcommands, in the order `bm6b --help` lists them. A module that is
# missing (an optional part not installed) is skipped.
COMMAND_MODULES = (
    "bm6b.pipelines.cli",  # curate, demo
    "bm6b.dedup.cli",  # dedup
    "bm6b.report.cli",  # report, inspect
    "bm6b.train.cli",  # train, eval, tokenizer
    "bm6b.filters.bilingual_encoder_cli",  # train-text-encoder
)


def _prepare_environment() -> None:
    # albumentations (imported by img2dataset) queries PyPI at import time unless NO_ALBUMENTATIONS_UPDATE is set,
    # and Hugging Face libraries wait on the hub; bm6b never downloads anything at run time.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bm6b",
        description="Build bilingual (zh/en) image-text training shards with Apache Beam, and train on them.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                continue
            raise
        module.register(subparsers)
    return parser


BEAM_TYPEHINT_LOGGER = "apache_beam.typehints.native_type_compatibility"


def main(argv: list[str] | None = None) -> int:
    _prepare_environment()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:
        # Beam logs one INFO line per string annotation it reads as Any (modules that use
        # ``from __future__ import annotations``), about 150 per curate run; keep them for DEBUG.
        logging.getLogger(BEAM_TYPEHINT_LOGGER).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "accepts_extra", False):
            return int(args.func(args, extra) or 0)
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as err:
        # Bad paths and values from the user: one line, not a traceback (which --log-level DEBUG shows).
        logging.getLogger("bm6b").debug("%s failed", args.command, exc_info=True)
        logging.getLogger("bm6b").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``bm6b report OUTPUT_DIR`` and ``bm6b inspect SHARD``."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def run_report_command(args: argparse.Namespace) -> int:
    from bm6b.report.render import write_report

    try:
        index = write_report(args.output_dir, clip_threshold=args.clip_threshold)
    except FileNotFoundError as err:
        logger.error("%s", err)
        return 2
    print(f"report written to {index}")
    return 0


def run_inspect_command(args: argparse.Namespace) -> int:
    from bm6b.report.inspect import inspect_shard

    try:
        text = inspect_shard(args.shard, count=args.count, keys=args.key, html_path=args.html)
    except (FileNotFoundError, KeyError, ValueError) as err:
        logger.error("%s", err.args[0] if isinstance(err, KeyError) else err)
        return 2
    print(text)
    if args.html:
        print(f"\nHTML view written to {args.html}")
    return 0


def register(subparsers) -> None:
    report = subparsers.add_parser(
        "report",
        help="write the HTML report with plots of a finished curate run",
        description="Read stats.json, the shard Parquet files and rejects/ of a curate output folder and write "
        "OUTPUT_DIR/report/index.html with PNG figures: the funnel per stage and reason for zh and en, CLIP "
        "score histograms, languages and scripts, image sizes, duplicate clusters and download errors.",
    )
    report.add_argument("output_dir", metavar="OUTPUT_DIR", help="curate output folder (local path or gs://...)")
    report.add_argument("--clip-threshold", type=float,
                        help="CLIP score threshold to mark on both histograms (default: per language, from stats.json "
                        "or from the low_clip_score rejects)")
    report.set_defaults(func=run_report_command)

    inspect = subparsers.add_parser(
        "inspect",
        help="print a few samples of an output shard, or render them as HTML",
        description="Print the fields of the first samples of a shard (from its Parquet file). With --html, also "
        "write a page that shows each sample's image from the tar beside its captions.",
    )
    inspect.add_argument("shard", metavar="SHARD", help="a shard file: OUTPUT/00000.tar or OUTPUT/00000.parquet")
    inspect.add_argument("-n", "--count", type=int, default=5, help="number of samples to show (default 5)")
    inspect.add_argument("--key", action="append", help="show the sample with this key instead (repeatable)")
    inspect.add_argument("--html", metavar="FILE", help="also write an HTML page with the images to FILE")
    inspect.set_defaults(func=run_inspect_command)

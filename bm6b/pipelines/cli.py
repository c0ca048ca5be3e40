"""``bm6b curate`` and ``bm6b demo``."""

from __future__ import annotations

import argparse
import ipaddress

from bm6b.dedup.cli import add_dedup_arguments, dedup_config_from_args
from bm6b.filters.captions import add_caption_arguments, caption_config_from_args
from bm6b.filters.download import FetchConfig
from bm6b.filters.image import ENCODE_FORMATS, INTERPOLATIONS, RESIZE_MODES, ImageConfig
from bm6b.pipelines import ingest
from bm6b.recipes import add_recipe_option
from bm6b.schemas.reasons import RETRYABLE


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 1 to 100, got {text}")
    return value


def cidr(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a network in CIDR form such as 127.0.0.0/8: {err}") from None
    return text


def add_curate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every curate option except the inputs and the output (shared by curate and demo)."""
    columns = parser.add_argument_group("manifest columns (detected from the header when not given)")
    columns.add_argument("--url-col", help="column holding the image URL (default: url, URL, image_url)")
    columns.add_argument("--caption-zh-col", help="column holding the Chinese caption")
    columns.add_argument("--caption-en-col", help="column holding the English caption")
    columns.add_argument("--caption-col", help="column holding a caption of either language; language ID assigns it")

    fetch = parser.add_argument_group(
        "download",
        "Fetching is guarded: URLs resolving to loopback, private, link-local (cloud metadata), multicast or "
        "reserved addresses are rejected as blocked_address unless --allow-network covers them.",
    )
    fetch.add_argument("--timeout", type=positive_float, default=FetchConfig.timeout,
                       help="seconds a single socket read may wait for data (default: %(default)s)")
    fetch.add_argument("--connect-timeout", type=positive_float, default=FetchConfig.connect_timeout,
                       help="seconds for the TCP connect and TLS handshake (default: %(default)s)")
    fetch.add_argument("--deadline", type=positive_float, default=FetchConfig.deadline,
                       help="total seconds per URL, redirects, retries and backoff included (default: %(default)s)")
    fetch.add_argument("--max-bytes", type=positive_int, default=FetchConfig.max_bytes,
                       help="maximum image size in bytes, checked on Content-Length and while reading (default: %(default)s)")
    fetch.add_argument("--min-throughput", type=non_negative_float, default=FetchConfig.min_throughput,
                       help="bytes per second below which a transfer is cut off as too_slow after "
                       f"{FetchConfig.throughput_grace:g}s; 0 disables (default: %(default)s)")
    fetch.add_argument("--max-redirects", type=non_negative_int, default=FetchConfig.max_redirects, help="redirects followed per URL, each hop checked by the SSRF guard (default: %(default)s)")
    fetch.add_argument("--retries", type=non_negative_int, default=FetchConfig.retries,
                       help="extra attempts for DNS, connect, timeout, reset, 429 and 5xx failures, with exponential "
                       "backoff and jitter; Retry-After is honoured (default: %(default)s)")
    fetch.add_argument("--user-agent", default=FetchConfig.user_agent, help="User-Agent header sent with each request")
    fetch.add_argument("--ignore-opt-out", action="store_true",
                       help="download even when X-Robots-Tag contains noai, noimageai, noindex, noimageindex or none")
    fetch.add_argument("--robots-txt", action="store_true",
                       help="fetch robots.txt once per host and skip disallowed URLs as opted_out")
    fetch.add_argument("--host-concurrency", type=non_negative_int, default=FetchConfig.host_concurrency,
                       help="simultaneous requests per host and worker; 0: no cap (default: %(default)s)")
    fetch.add_argument("--host-rate", type=non_negative_float, default=FetchConfig.host_rate,
                       help="requests per second per host and worker (token bucket); 0: no limit (default: %(default)s)")
    fetch.add_argument("--max-connections", type=non_negative_int, default=FetchConfig.max_connections,
                       help="simultaneous requests per worker over all hosts; 0: no cap (default: %(default)s)")
    fetch.add_argument("--breaker-failures", type=non_negative_int, default=FetchConfig.breaker_failures,
                       help="consecutive failures after which a host is skipped as host_failing for "
                       f"{FetchConfig.breaker_cooldown:g}s; 0 disables (default: %(default)s)")
    fetch.add_argument(
        "--allow-network",
        action="append",
        default=[],
        type=cidr,
        metavar="CIDR",
        help="exempt a network from the SSRF guard, e.g. 127.0.0.0/8 for a local test server (repeatable)",
    )
    fetch.add_argument("--dns-concurrency", type=positive_int, default=FetchConfig.dns_concurrency,
                       help="simultaneous DNS lookups per worker; a lookup past its URL's deadline keeps its slot "
                       "until the resolver returns (default: %(default)s)")
    fetch.add_argument("--download-threads", type=positive_int, default=16, help="concurrent downloads per worker (default: %(default)s)")
    fetch.add_argument("--retry-failed", metavar="PREVIOUS_OUTPUT",
                       help="re-run only the samples that PREVIOUS_OUTPUT rejected for a retryable reason ("
                       f"{', '.join(sorted(RETRYABLE))}); pass the same column options")

    image = parser.add_argument_group("images")
    image.add_argument("--image-size", type=positive_int, default=ImageConfig.image_size, help="output size in pixels, applied according to --resize-mode (default: %(default)s)")
    image.add_argument("--resize-mode", default=ImageConfig.resize_mode, choices=list(RESIZE_MODES),
                       help="keep_ratio: shorter side becomes --image-size; keep_ratio_largest: longer side does; "
                       "center_crop: shorter side, then the centre square; border: longer side, then padded to a "
                       "square; no: keep the size (default: %(default)s)")
    image.add_argument("--resize-upscale", action="store_true",
                       help="let keep_ratio and keep_ratio_largest enlarge smaller images (they only shrink by default)")
    image.add_argument("--upscale-interpolation", default=ImageConfig.upscale_interpolation, choices=list(INTERPOLATIONS),
                       help="resampling filter when the output is larger than the source (default: %(default)s)")
    image.add_argument("--downscale-interpolation", default=ImageConfig.downscale_interpolation,
                       choices=list(INTERPOLATIONS),
                       help="resampling filter when the output is smaller; area averages the covered source pixels "
                       "(default: %(default)s)")
    image.add_argument("--encode-format", default=ImageConfig.encode_format, choices=list(ENCODE_FORMATS),
                       help="stored image format (default: %(default)s)")
    image.add_argument("--jpeg-quality", type=quality, default=ImageConfig.jpeg_quality,
                       help="JPEG quality, 1-100, for --encode-format jpg (default: %(default)s)")
    image.add_argument("--webp-quality", type=quality, default=ImageConfig.webp_quality,
                       help="WebP quality, 1-100, for --encode-format webp (default: %(default)s)")
    image.add_argument("--background", default="255,255,255", metavar="R,G,B",
                       help="colour behind transparent pixels and border padding (default: %(default)s)")
    image.add_argument("--max-pixels", type=positive_int, default=ImageConfig.max_pixels,
                       help="reject images with more pixels as decompression_bomb (default: %(default)s)")
    image.add_argument("--min-image-size", type=non_negative_int, default=0, help="reject images whose shorter side has fewer pixels as too_small; 0: off "
                       "(default: %(default)s; the bm6b-default recipe sets 64)")
    image.add_argument("--max-aspect-ratio", type=non_negative_float, default=0.0, help="reject images whose longer/shorter side ratio is above this as bad_aspect_ratio; 0: off "
                       "(default: %(default)s; the bm6b-default recipe sets 3.0)")

    clip = parser.add_argument_group(
        "CLIP score",
        "Score each caption against its image with an open_clip model through Beam RunInference. Scoring is off "
        "unless a model or checkpoint is given. Thresholds reject samples as low_clip_score: a sample passes when "
        "every scored caption meets its language's threshold.",
    )
    clip.add_argument("--clip-model", help="open_clip model config for both languages, e.g. ViT-B-32 or bm6b-tiny")
    clip.add_argument(
        "--clip-checkpoint",
        help="weights for --clip-model: a checkpoint file (open_clip or `bm6b train`), a folder with one, or an "
        "open_clip pretrained tag (needs hub access or open_clip's cache); default: random init with a fixed seed",
    )
    for language, name in (("zh", "Chinese"), ("en", "English")):
        clip.add_argument(f"--clip-model-{language}", help=f"a separate model config for {name} captions")
        clip.add_argument(f"--clip-checkpoint-{language}", help=f"weights of the {name} caption model")
    clip.add_argument("--clip-device", default="cpu", help="torch device for scoring: cpu, cuda or cuda:N")
    clip.add_argument("--clip-precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                      help="dtype of the model weights; fp16 needs CUDA (default: fp32)")
    clip.add_argument("--clip-batch-size", type=positive_int, default=64, help="maximum images per model call (default: 64)")
    clip.add_argument("--clip-min-batch-size", type=positive_int, default=1,
                      help="minimum images per model call; Beam grows batches between the two (default: 1)")
    clip.add_argument("--clip-min-score", type=float, metavar="COSINE",
                      help="reject samples with a caption scoring below this cosine similarity, in every scored language")
    clip.add_argument("--clip-top-fraction", type=float, metavar="F",
                      help="keep the top F (0 < F <= 1) of each language's scores over the run, e.g. 0.3; "
                      "computed in a first pass with approximate quantiles (0.1%% resolution)")
    for language in ("zh", "en"):
        clip.add_argument(f"--clip-min-score-{language}", type=float, metavar="COSINE",
                          help=f"minimum score for {language} captions, replacing --clip-min-score/--clip-top-fraction")
        clip.add_argument(f"--clip-top-fraction-{language}", type=float, metavar="F",
                          help=f"top fraction for {language} captions, replacing --clip-min-score/--clip-top-fraction")
    clip.add_argument("--clip-keep-embeddings", action="store_true",
                      help="store float16 image and text embeddings in the Parquet shards (one model only)")

    add_caption_arguments(parser)
    add_dedup_arguments(parser)

    out = parser.add_argument_group("output")
    out.add_argument("--samples-per-shard", type=positive_int, default=10_000,
                     help="samples per WebDataset tar and Parquet file (default: %(default)s)")
    out.add_argument("--overwrite", action="store_true", help="replace curate output already in --output")


def parse_rgb(text: str) -> tuple[int, int, int]:
    """Parse "R,G,B" with each value 0-255; raise ValueError naming the option otherwise."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"--background {text!r} is invalid; expected R,G,B with each value 0-255, e.g. 255,255,255")
    return values


def config_from_args(args: argparse.Namespace, inputs: list[str], output: str):
    from bm6b.pipelines.curate import CurateConfig

    return CurateConfig(
        inputs=inputs,
        output=output,
        columns=ingest.ColumnMap(args.url_col, args.caption_zh_col, args.caption_en_col, args.caption_col),
        fetch=FetchConfig(
            timeout=args.timeout,
            connect_timeout=args.connect_timeout,
            deadline=args.deadline,
            max_bytes=args.max_bytes,
            min_throughput=args.min_throughput,
            max_redirects=args.max_redirects,
            retries=args.retries,
            user_agent=args.user_agent,
            allow_networks=tuple(args.allow_network),
            respect_opt_out=not args.ignore_opt_out,
            check_robots_txt=args.robots_txt,
            host_concurrency=args.host_concurrency,
            host_rate=args.host_rate,
            max_connections=args.max_connections,
            breaker_failures=args.breaker_failures,
            dns_concurrency=args.dns_concurrency,
        ),
        image=ImageConfig(
            image_size=args.image_size,
            resize_mode=args.resize_mode,
            resize_only_if_bigger=not args.resize_upscale,
            upscale_interpolation=args.upscale_interpolation,
            downscale_interpolation=args.downscale_interpolation,
            encode_format=args.encode_format,
            jpeg_quality=args.jpeg_quality,
            webp_quality=args.webp_quality,
            background=parse_rgb(args.background),
            max_pixels=args.max_pixels,
            min_size=args.min_image_size,
            max_aspect_ratio=args.max_aspect_ratio,
        ),
        download_threads=args.download_threads,
        retry_failed=args.retry_failed,
        clip_model=args.clip_model,
        clip_checkpoint=args.clip_checkpoint,
        clip_model_zh=args.clip_model_zh,
        clip_checkpoint_zh=args.clip_checkpoint_zh,
        clip_model_en=args.clip_model_en,
        clip_checkpoint_en=args.clip_checkpoint_en,
        clip_device=args.clip_device,
        clip_precision=args.clip_precision,
        clip_batch_size=args.clip_batch_size,
        clip_min_batch_size=args.clip_min_batch_size,
        clip_min_score=args.clip_min_score,
        clip_min_score_zh=args.clip_min_score_zh,
        clip_min_score_en=args.clip_min_score_en,
        clip_top_fraction=args.clip_top_fraction,
        clip_top_fraction_zh=args.clip_top_fraction_zh,
        clip_top_fraction_en=args.clip_top_fraction_en,
        clip_keep_embeddings=args.clip_keep_embeddings,
        captions=caption_config_from_args(args),
        dedup=dedup_config_from_args(args),
        samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
    )


def run_curate_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    from bm6b.pipelines.curate import run_curate
    from bm6b.pipelines.stats import format_funnel

    # bm6b.cli.main turns a FileNotFoundError or ValueError into a one-line error and exit code 2.
    stats = run_curate(config_from_args(args, args.inputs, args.output), beam_args)
    print(format_funnel(stats))
    print(f"shards, rejects and stats.json are in {args.output}")
    return 0


def run_demo_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    from bm6b.pipelines.demo import run_demo

    return run_demo(args, beam_args)


def register(subparsers) -> None:
    curate = subparsers.add_parser(
        "curate",
        help="turn URL + caption manifests into WebDataset and Parquet shards",
        description="Run the curate job. Options this command does not know (e.g. --runner DataflowRunner "
        "--project P --region R --temp_location gs://...) are passed to Apache Beam; the default runner is "
        "the in-process FnApiRunner.",
    )
    curate.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="manifest files or globs (.parquet, .csv, .tsv, .jsonl, optionally .gz), or img2dataset "
                        "output folders (webdataset or parquet format); none is needed with --retry-failed")
    curate.add_argument("--output", "-o", required=True, help="output folder (local path or gs://...)")
    add_curate_arguments(curate)
    add_recipe_option(curate)
    curate.set_defaults(func=run_curate_command, accepts_extra=True)

    demo = subparsers.add_parser(
        "demo",
        help="serve the bundled sample photos on 127.0.0.1 and curate them",
        description="Start a loopback HTTP server over the bundled sample of redistributable photos, write a "
        "manifest with their real captions plus a few dead links, run curate on it and print the funnel.",
    )
    demo.add_argument("--output", "-o", default="bm6b-demo", help="output folder (default: ./bm6b-demo)")
    add_curate_arguments(demo)
    add_recipe_option(demo)
    demo.set_defaults(func=run_demo_command, accepts_extra=True, clip_model_default="bm6b-tiny")

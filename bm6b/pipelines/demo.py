"""``bm6b demo``: curate the bundled sample of redistributable photos, served from 127.0.0.1."""

from __future__ import annotations

import argparse
import csv
import functools
import http.server
import logging
import os
import socket
import threading
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.0/8"


def sample_dir() -> Path:
    return Path(str(resources.files("bm6b") / "sample"))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        logger.debug("sample server: " + format, *args)


class SampleServer:
    """A threaded HTTP server on 127.0.0.1 (any free port) over the bundled sample images."""

    def __init__(self, directory: Path | None = None):
        directory = directory or sample_dir() / "images"
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="bm6b-sample-server", daemon=True)

    def __enter__(self) -> "SampleServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


def _closed_port() -> int:
    """Return a loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_sample_manifest(path: Path, server: SampleServer) -> int:
    """Write the demo manifest (url, caption_en, caption_zh) and return its number of rows.

    Besides one row per bundled image it adds rows that must be rejected: a missing file (HTTP
    404), a port with no server (connection refused), a non-HTTP URL, a row without a URL, and the
    cat photo again under a second URL (an exact duplicate image).
    """
    with open(sample_dir() / "captions.tsv", encoding="utf-8", newline="") as handle:
        images = list(csv.DictReader(handle, delimiter="\t"))
    rows = [(server.url(r["file"]), r["caption_en"], r["caption_zh"]) for r in images]
    rows += [
        (server.url("skimage_chelsea.png?copy=2"), "Chelsea the cat.", ""),
        (server.url("no_such_photo.jpg"), "A photo that was deleted.", "一张已被删除的照片"),
        (f"http://127.0.0.1:{_closed_port()}/offline.jpg", "A photo on a server that is down.", ""),
        ("ftp://127.0.0.1/photo.jpg", "A photo behind an FTP link.", ""),
        ("", "A row without a URL.", ""),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["url", "caption_en", "caption_zh"])
        writer.writerows(rows)
    return len(rows)


def run_demo(args: argparse.Namespace, beam_args: list[str]) -> int:
    from bm6b.pipelines.cli import config_from_args
    from bm6b.pipelines.curate import run_curate
    from bm6b.pipelines.stats import format_funnel

    output = Path(args.output).resolve()
    manifest = output.parent / f"{output.name}-manifest.tsv"
    if args.clip_model is None:
        args.clip_model = "bm6b-tiny"  # random init: shows the stage runs; the scores mean nothing
    if LOOPBACK not in args.allow_network:
        args.allow_network.append(LOOPBACK)
    args.overwrite = True

    with SampleServer() as server:
        rows = write_sample_manifest(manifest, server)
        logger.info("demo: serving %s on 127.0.0.1:%d, %d manifest rows in %s",
                    sample_dir() / "images", server.port, rows, manifest)
        stats = run_curate(config_from_args(args, [str(manifest)], str(output)), beam_args)

    print(format_funnel(stats))
    print(f"\nshards: {output}{os.sep}00000.tar (+ .parquet); rejects: {output}{os.sep}rejects; stats: {output}{os.sep}stats.json")
    print("open them with:  python -c \"import webdataset as wds; "
          f"print(next(iter(wds.WebDataset('{output}/00000.tar', shardshuffle=False))).keys())\"")
    return 0

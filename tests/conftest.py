"""Shared fixtures: a loopback-only network guard, the real-data folder and a local HTTP server."""

from __future__ import annotations

import contextlib
import functools
import http.server
import ipaddress
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_RAW = Path(os.environ.get("BM6B_SHARED_RAW", REPO_ROOT.parent / "shared" / "data" / "raw"))


def _is_loopback(host) -> bool:
    if host in (None, "", "localhost"):
        return host == "localhost"
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class NetworkGuardError(AssertionError):
    pass


@contextlib.contextmanager
def network_guard():
    """Make any DNS lookup or connect that does not stay on this machine fail with NetworkGuardError."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host):
            raise NetworkGuardError(f"test tried to resolve non-loopback host {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(address):
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            raise NetworkGuardError(f"test tried to connect to non-loopback address {address!r}")

    def guarded_connect(sock, address):
        check(address)
        return real_connect(sock, address)

    def guarded_connect_ex(sock, address):
        check(address)
        return real_connect_ex(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
        patch.setattr(socket.socket, "connect", guarded_connect)
        patch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        yield


@pytest.fixture(autouse=True)
def loopback_only_network():
    """Fail the test on any DNS lookup or connect that does not stay on this machine."""
    with network_guard():
        yield


@pytest.fixture(scope="session")
def shared_raw() -> Path:
    """The real third-party data folder (../shared/data/raw); skips the test when it is absent."""
    if not SHARED_RAW.is_dir():
        pytest.skip(f"real data folder {SHARED_RAW} not found; set BM6B_SHARED_RAW to run this test")
    return SHARED_RAW


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 serving one folder; ``url(name)`` builds file URLs."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve_folder():
    """Return a function that starts a loopback server over a folder; all are stopped after the test."""
    servers: list[LocalServer] = []

    def start(directory: Path) -> LocalServer:
        server = LocalServer(directory)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def flickr8k_run(shared_raw, tmp_path_factory):
    """Curate the 1,000 real Flickr8k photos served from 127.0.0.1, once per test session.

    Returns a dict with ``output`` (the output folder), ``stats`` (what run_curate returned) and
    the facts of the manifest built by ``tests/flickr8k.py`` (rows, dead links, duplicate, captions).
    """
    from bm6b.filters.download import FetchConfig
    from bm6b.pipelines.curate import CurateConfig, run_curate
    from flickr8k import write_flickr8k_manifests

    folder = tmp_path_factory.mktemp("flickr8k")
    server = LocalServer(shared_raw / "flickr8k-images" / "images")
    try:
        with network_guard():
            facts = write_flickr8k_manifests(shared_raw, folder / "manifests", f"http://127.0.0.1:{server.port}")
            config = CurateConfig(
                inputs=facts["paths"],
                output=str(folder / "out"),
                fetch=FetchConfig(allow_networks=("127.0.0.0/8",), timeout=5.0),
                clip_model="bm6b-tiny",
                samples_per_shard=400,
            )
            stats = run_curate(config)
    finally:
        server.close()
    return {"output": folder / "out", "stats": stats, **facts}

"""Shared fixtures: a loopback-only network guard, the real-data folder and a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import ipaddress
import os
import socket
import threading
from pathlib import Path

import pytest

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


@pytest.fixture(autouse=True)
def loopback_only_network(monkeypatch):
    """Fail the test on any DNS lookup or connect that does not stay on this machine."""
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

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
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

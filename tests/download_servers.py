"""Misbehaving HTTP servers on 127.0.0.1 for the download tests, written on raw sockets.

``HostileServer`` answers each path with one behaviour (slow drip, endless body, lying
Content-Length, redirect loop, 429 with Retry-After, reset, gzip bomb, ...) and counts the requests
it receives per path, so tests can check both the client's verdict and what reached the server.
"""

from __future__ import annotations

import collections
import gzip
import io
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
import zlib

NGINX_404 = (
    b"<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center>"
    b"<hr><center>nginx</center></body></html>"
)
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
# The body of the response that /excess-body/ hides after its declared body. It starts with the
# JPEG signature so that only a body comparison distinguishes it from a real image.
SMUGGLED = b"\xff\xd8\xff\xe0" + b"smuggled response" * 4


def make_jpeg(width: int = 64, height: int = 48, color=(200, 30, 30), quality: int = 90) -> bytes:
    """Return a solid-colour JPEG; distinct colours give distinct bytes for dedup-sensitive tests."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_noise_jpeg(seed: int, width: int = 96, height: int = 72) -> bytes:
    """Return a JPEG of random noise: distinct seeds give images that no pHash or sha256 dedup merges."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _gzip_bomb(expanded_bytes: int) -> bytes:
    return gzip.compress(b"\0" * expanded_bytes, compresslevel=9)


class _Handler(socketserver.BaseRequestHandler):
    server: "_TCPServer"

    def setup(self):
        with self.server.owner.lock:
            self.server.owner.connections += 1
        self.request.settimeout(30)
        self.reader = self.request.makefile("rb")

    def _read_request(self) -> tuple[str, dict[str, str]] | None:
        line = self.reader.readline(65536)
        if not line:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) < 2:
            return None
        headers = {}
        while True:
            header = self.reader.readline(65536)
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return parts[1], headers

    def handle(self):
        owner: HostileServer = self.server.owner
        while not owner.stopping.is_set():
            try:
                request = self._read_request()
            except OSError:
                return
            if request is None:
                return
            target, headers = request
            path = urllib.parse.urlsplit(target).path
            with owner.lock:
                owner.requests[path] += 1
                owner.request_log.append((time.monotonic(), path))
                owner.user_agents.append(headers.get("user-agent", ""))
                owner.active += 1
                owner.max_active = max(owner.max_active, owner.active)
            try:
                keep = owner.respond(self.request, target, path)
            except OSError:
                return
            finally:
                with owner.lock:
                    owner.active -= 1
            if not keep:
                return


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the default backlog of 5 drops SYNs when a test opens dozens of connections
    owner: "HostileServer"


class HostileServer:
    """A loopback HTTP server whose paths each misbehave in one way; see ``respond`` for the list."""

    def __init__(self, images: dict[str, bytes] | None = None, drip_interval: float = 0.2):
        self.images = images or {}
        self.drip_interval = drip_interval
        self.requests: collections.Counter = collections.Counter()
        self.request_log: list[tuple[float, str]] = []  # (time.monotonic() at arrival, path) per request
        self.user_agents: list[str] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.delay_paths: dict[str, float] = {}  # path -> seconds to hold before answering
        self.fail_first: dict[str, int] = {}  # /flaky/NAME answers 503 this many times, then the image
        self.robots_txt: bytes | None = None
        self.robots_status = 200
        self.server = _TCPServer(("127.0.0.1", 0), _Handler)
        self.server.owner = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ behaviours

    @staticmethod
    def _head(status: str, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, sock, status: str, body: bytes, content_type="image/jpeg", extra=None, keep=True) -> bool:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        headers.update(extra or {})
        if not keep:
            headers["Connection"] = "close"
        sock.sendall(self._head(status, headers) + body)
        return keep

    def _drip(self, sock, payload: bytes, step: int) -> None:
        for i in range(0, len(payload), step):
            if self.stopping.is_set():
                return
            sock.sendall(payload[i : i + step])
            time.sleep(self.drip_interval)

    def respond(self, sock, target: str, path: str) -> bool:
        """Answer one request; return True to keep the connection open for another."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        delay = self.delay_paths.get(path)
        if delay:
            time.sleep(delay)
        count = self.requests[path]
        name = path.rsplit("/", 1)[-1]

        if path.startswith("/img/") and name in self.images:
            return self._send(sock, "200 OK", self.images[name])
        if path.startswith("/text-plain/") and name in self.images:
            return self._send(sock, "200 OK", self.images[name], content_type="text/plain")
        if path.startswith("/no-type/") and name in self.images:
            sock.sendall(self._head("200 OK", {"Content-Length": str(len(self.images[name]))}) + self.images[name])
            return True
        if path.startswith("/flaky/") and name in self.images:
            with self.lock:
                failing = self.fail_first.get(name, 0) > 0
                if failing:
                    self.fail_first[name] -= 1
            if failing:
                return self._send(sock, "503 Service Unavailable", b"busy", content_type="text/plain")
            return self._send(sock, "200 OK", self.images[name])
        if path == "/robots.txt":
            if self.robots_txt is None:
                return self._send(sock, "404 Not Found", b"", content_type="text/plain")
            return self._send(sock, f"{self.robots_status} X", self.robots_txt, content_type="text/plain")
        if path.startswith("/noai/") and name in self.images:
            return self._send(sock, "200 OK", self.images[name], extra={"X-Robots-Tag": "noai, noimageai"})
        if path.startswith("/otherbot-noindex/") and name in self.images:
            return self._send(sock, "200 OK", self.images[name], extra={"X-Robots-Tag": "otherbot: noindex"})
        if path.startswith("/early-hints/") and name in self.images:
            # ?hints=N 103 Early Hints responses (2 by default), then a 100 Continue, then the 200.
            hint = self._head("103 Early Hints", {"Link": "</style.css>; rel=preload; as=style"})
            hints = int(query.get("hints", ["2"])[0])
            sock.sendall(hint * hints + b"HTTP/1.1 100 Continue\r\n\r\n")
            return self._send(sock, "200 OK", self.images[name])
        if path == "/endless-early-hints":
            hint = self._head("103 Early Hints", {"Link": "</style.css>; rel=preload; as=style"})
            while not self.stopping.is_set():
                sock.sendall(hint)  # raises OSError once the client closes the connection
            return False
        if path == "/html-as-jpeg":
            return self._send(sock, "200 OK", NGINX_404, content_type="image/jpeg")
        if path == "/svg":
            return self._send(sock, "200 OK", SVG, content_type="image/svg+xml")
        if path == "/empty":
            return self._send(sock, "200 OK", b"")
        if path == "/404":
            return self._send(sock, "404 Not Found", NGINX_404, content_type="text/html")
        if path == "/403":
            return self._send(sock, "403 Forbidden", b"forbidden", content_type="text/plain")
        if path == "/500":
            return self._send(sock, "500 Internal Server Error", b"oops", content_type="text/plain")
        if path == "/503-then-ok":
            if count == 1:
                return self._send(sock, "503 Service Unavailable", b"busy", content_type="text/plain")
            return self._send(sock, "200 OK", next(iter(self.images.values())))
        if path == "/429-then-ok":
            if count == 1:
                return self._send(sock, "429 Too Many Requests", b"slow down", "text/plain", {"Retry-After": "1"})
            return self._send(sock, "200 OK", next(iter(self.images.values())))
        if path == "/503-retry-after":
            return self._send(sock, "503 Service Unavailable", b"busy", "text/plain", {"Retry-After": "1"})
        if path == "/429-long":
            return self._send(sock, "429 Too Many Requests", b"slow down", "text/plain", {"Retry-After": "3600"})
        if path == "/redirect-loop":
            return self._send(sock, "302 Found", b"", "text/plain", {"Location": "/redirect-loop"})
        if path.startswith("/redirect-chain/"):
            hops = int(name)
            location = "/img/" + next(iter(self.images)) if hops <= 1 else f"/redirect-chain/{hops - 1}"
            return self._send(sock, "302 Found", b"", "text/plain", {"Location": location})
        if path == "/redirect-to":
            return self._send(sock, "302 Found", b"", "text/plain", {"Location": query["u"][0]})
        if path == "/big-length":
            sock.sendall(self._head("200 OK", {"Content-Type": "image/jpeg", "Content-Length": str(10**9)}))
            return False
        if path == "/endless":
            image = next(iter(self.images.values()))
            sock.sendall(self._head("200 OK", {"Content-Type": "image/jpeg"}) + image[:64])
            block = b"\xff" * 65536
            while not self.stopping.is_set():
                sock.sendall(block)
            return False
        if path == "/slow-drip":
            image = next(iter(self.images.values()))
            sock.sendall(self._head("200 OK", {"Content-Type": "image/jpeg", "Content-Length": str(len(image))}))
            self._drip(sock, image, 16)
            return False
        if path == "/slow-headers":
            self._drip(sock, self._head("200 OK", {"Content-Type": "image/jpeg", "X-Padding": "a" * 4000}), 1)
            return False
        if path == "/stall":
            image = next(iter(self.images.values()))
            sock.sendall(self._head("200 OK", {"Content-Type": "image/jpeg", "Content-Length": str(len(image))}) + image[:100])
            self.stopping.wait(60)
            return False
        if path == "/lying-long":
            image = next(iter(self.images.values()))
            headers = {"Content-Type": "image/jpeg", "Content-Length": str(len(image) * 2), "Connection": "close"}
            sock.sendall(self._head("200 OK", headers) + image)
            return False
        if path == "/lying-short":
            image = next(iter(self.images.values()))
            headers = {"Content-Type": "image/jpeg", "Content-Length": str(len(image) // 2), "Connection": "close"}
            sock.sendall(self._head("200 OK", headers) + image)
            return False
        if path.startswith("/excess-body/") and name in self.images:
            # The body is longer than its Content-Length: a whole second response follows it on
            # the kept-alive connection, which a client must not read as the response to its next request.
            smuggled = self._head("200 OK", {"Content-Type": "image/jpeg", "Content-Length": str(len(SMUGGLED))}) + SMUGGLED
            headers = {"Content-Type": "image/jpeg", "Content-Length": str(len(self.images[name]))}
            sock.sendall(self._head("200 OK", headers) + self.images[name] + smuggled)
            return True
        if path == "/conflicting-length":
            image = next(iter(self.images.values()))
            head = self._head("200 OK", {"Content-Type": "image/jpeg", "Content-Length": "10", "Connection": "close"})
            # http.client reads the first Content-Length, and the second one is the true body size.
            sock.sendall(head[:-2] + f"Content-Length: {len(image)}\r\n\r\n".encode("latin-1") + image)
            return False
        if path in ("/length-list", "/length-negative"):
            image = next(iter(self.images.values()))
            length = f"10, {len(image)}" if path == "/length-list" else "-1"
            sock.sendall(self._head("200 OK", {"Content-Type": "image/jpeg", "Content-Length": length}) + image)
            return True
        if path == "/reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if path == "/close-early":
            return False
        if path == "/not-http":
            sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            return False
        if path.startswith(("/deflate/", "/raw-deflate/")) and name in self.images:
            # "deflate" means a zlib stream (RFC 9110), but some servers send raw deflate data.
            compressor = zlib.compressobj(wbits=zlib.MAX_WBITS if path.startswith("/deflate/") else -zlib.MAX_WBITS)
            body = compressor.compress(self.images[name]) + compressor.flush()
            headers = {"Content-Type": "image/jpeg", "Content-Encoding": "deflate", "Content-Length": str(len(body))}
            sock.sendall(self._head("200 OK", headers) + body)
            return True
        if path == "/bad-gzip":
            body = b"this is not gzip data " * 20
            headers = {"Content-Type": "image/jpeg", "Content-Encoding": "gzip", "Content-Length": str(len(body))}
            sock.sendall(self._head("200 OK", headers) + body)
            return True
        if path == "/gzip-bomb":
            body = self.gzip_bomb()
            headers = {"Content-Type": "image/jpeg", "Content-Encoding": "gzip", "Content-Length": str(len(body))}
            sock.sendall(self._head("200 OK", headers) + body)
            return True
        return self._send(sock, "404 Not Found", NGINX_404, content_type="text/html")

    _bomb: bytes | None = None

    def gzip_bomb(self) -> bytes:
        if HostileServer._bomb is None:
            HostileServer._bomb = _gzip_bomb(64 * 1024 * 1024)  # 64 MiB of zeros, about 64 KiB compressed
        return HostileServer._bomb

"""HTTP(S) fetching with deadlines, a byte cap and an SSRF guard.

``Fetcher.fetch`` never raises for a network or HTTP failure: it returns a ``FetchResult`` whose
``reason`` is one of the download codes of ``bm6b.schemas.reasons``. The host is resolved once,
every resolved address is checked against the guard before any socket is opened, and the
connection goes to the checked address (no second DNS lookup that could return another one).
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from typing import Callable

from bm6b.schemas.reasons import Reason

Resolver = Callable[[str, int], list[str]]


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    timeout: float = 10.0  # seconds, for connect and for each read
    deadline: float = 30.0  # seconds, total per URL including redirects
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    user_agent: str = "bm6b/0.1 (+https://github.com/bm6b/bm6b; image-text dataset research)"
    # CIDRs exempt from the SSRF guard, e.g. ("127.0.0.0/8",) for a loopback test server.
    allow_networks: tuple[str, ...] = ()


@dataclasses.dataclass
class FetchResult:
    url: str
    body: bytes | None = None
    status: int | None = None
    content_type: str | None = None
    reason: str | None = None  # a reject reason code when the fetch failed
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


class BlockedAddress(Exception):
    pass


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_blocked_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Return True for addresses a public crawler must not reach (loopback, private, metadata, ...)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return is_blocked_ip(ip.ipv4_mapped)
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


class AddressGuard:
    """Checks resolved addresses against the blocked ranges, with an explicit CIDR allowlist."""

    def __init__(self, allow_networks: tuple[str, ...] = ()):
        self.allow = [ipaddress.ip_network(cidr, strict=False) for cidr in allow_networks]

    def check(self, address: str) -> None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in network for network in self.allow):
            return
        if is_blocked_ip(ip):
            raise BlockedAddress(f"{address} is a non-public address")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


class Fetcher:
    def __init__(self, config: FetchConfig | None = None, resolver: Resolver | None = None):
        self.config = config or FetchConfig()
        self.resolver = resolver or system_resolver
        self.guard = AddressGuard(self.config.allow_networks)

    def fetch(self, url: str) -> FetchResult:
        started = time.monotonic()
        current = url
        for _ in range(self.config.max_redirects + 1):
            result, location = self._fetch_once(current, started)
            if location is None:
                result.url = url
                return result
            current = urllib.parse.urljoin(current, location)
        return FetchResult(url, reason=Reason.TOO_MANY_REDIRECTS.value, detail=f"more than {self.config.max_redirects} redirects")

    def _fetch_once(self, url: str, started: float) -> tuple[FetchResult, str | None]:
        cfg = self.config
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return FetchResult(url, reason=Reason.UNSUPPORTED_SCHEME.value, detail=f"scheme {parts.scheme!r}"), None
        host = parts.hostname
        if not host:
            return FetchResult(url, reason=Reason.INVALID_URL.value, detail="no host"), None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as err:
            return FetchResult(url, reason=Reason.INVALID_URL.value, detail=str(err)), None

        try:
            addresses = self.resolver(host, port)
        except (socket.gaierror, UnicodeError) as err:
            return FetchResult(url, reason=Reason.DNS.value, detail=f"{host}: {err}"), None
        if not addresses:
            return FetchResult(url, reason=Reason.DNS.value, detail=f"{host}: no address"), None
        try:
            for address in addresses:
                self.guard.check(address)
        except BlockedAddress as err:
            return FetchResult(url, reason=Reason.BLOCKED_ADDRESS.value, detail=f"{host}: {err}"), None

        conn_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = conn_cls(host, port, addresses[0], timeout=cfg.timeout)
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            conn.request("GET", path, headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"})
            response = conn.getresponse()
            status = response.status
            if status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if location:
                    return FetchResult(url, status=status), location
            if status != 200:
                return FetchResult(url, status=status, reason=_status_reason(status), detail=f"HTTP {status}"), None

            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                return FetchResult(url, status=status, reason=Reason.TOO_LARGE.value, detail=f"Content-Length {length}"), None
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() - started > cfg.deadline:
                    return FetchResult(url, status=status, reason=Reason.TIMEOUT.value, detail=f"deadline {cfg.deadline}s"), None
                chunk = response.read(64 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > cfg.max_bytes:
                    return FetchResult(url, status=status, reason=Reason.TOO_LARGE.value, detail=f"more than {cfg.max_bytes} bytes"), None
                chunks.append(chunk)
            return FetchResult(url, body=b"".join(chunks), status=status, content_type=response.getheader("Content-Type")), None
        except (socket.timeout, TimeoutError) as err:
            return FetchResult(url, reason=Reason.TIMEOUT.value, detail=str(err) or "timed out"), None
        except (ConnectionRefusedError, ssl.SSLError) as err:
            return FetchResult(url, reason=Reason.CONNECT.value, detail=str(err)), None
        except (ConnectionResetError, http.client.IncompleteRead, http.client.RemoteDisconnected, BrokenPipeError) as err:
            return FetchResult(url, reason=Reason.RESET.value, detail=str(err) or type(err).__name__), None
        except (OSError, http.client.HTTPException) as err:
            return FetchResult(url, reason=Reason.CONNECT.value, detail=f"{type(err).__name__}: {err}"), None
        finally:
            conn.close()


def _status_reason(status: int) -> str:
    if status == 404:
        return Reason.HTTP_404.value
    if status == 429:
        return Reason.HTTP_429.value
    if 500 <= status < 600:
        return Reason.HTTP_5XX.value
    return Reason.HTTP_ERROR.value

"""HTTP(S) fetching for web-scale image downloads: deadlines, caps, retries, politeness, SSRF guard.

``Fetcher.fetch`` never raises for a network, HTTP or content failure: it returns a
``FetchResult`` whose ``reason`` is a download code of ``bm6b.schemas.reasons``.

Safety: every hop (the first URL and each redirect) is resolved once, every resolved address is
checked by ``AddressGuard`` before any socket exists, and the socket connects to the checked
address itself, so a second DNS answer cannot move the connection elsewhere. Literal IPs in any
spelling (decimal ``2130706433``, octal ``0177.0.0.1``, hex, short ``127.1``, IPv6 with embedded
IPv4) are parsed here the way resolvers and browsers read them, and checked the same way.

Time: ``deadline`` bounds the whole fetch of one URL (DNS lookups, redirects, retries and backoff
waits included) except the wait for a politeness slot, which ``host_wait`` bounds separately. A
watchdog shuts the socket down when the deadline passes, so slow headers or a trickling body
cannot hold a thread. Lookups run on their own threads, and a fetch stops waiting for one when
its deadline passes, so a stuck resolver cannot hold a thread either.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import heapq
import http.client
import ipaddress
import itertools
import logging
import random
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from typing import Callable

from bm6b.filters.politeness import CircuitBreaker, HostBusy, HostLimiter
from bm6b.filters.robots import ROBOTS_MAX_BYTES, RobotsCache, user_agent_token, x_robots_opt_out
from bm6b.filters.sniff import SNIFF_BYTES, describe_non_image, sniff_image_format
from bm6b.schemas.reasons import RETRYABLE, Reason

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_USER_AGENT = "bm6b/0.1 (+https://github.com/bm6b/bm6b; image-text dataset research)"
READ_CHUNK = 64 * 1024

# Failures that count towards a host's circuit breaker: the host, not the URL, looks unwell. They
# are the retryable reasons except the breaker's own host_failing and truncated_shard, which only
# the img2dataset reader returns.
_HOST_FAILURES = RETRYABLE - {Reason.HOST_FAILING.value, Reason.TRUNCATED_SHARD.value}
# Failures worth another attempt inside the same fetch.
_RETRY_IN_FETCH = _HOST_FAILURES


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    timeout: float = 10.0  # seconds a single socket read may wait for data
    connect_timeout: float = 5.0  # seconds for the TCP connect (and the TLS handshake)
    deadline: float = 30.0  # seconds for the whole URL: redirects, retries and backoff included
    max_bytes: int = 20 * 1024 * 1024  # cap on the body, checked on Content-Length and while reading
    min_throughput: float = 4096.0  # bytes per second; a slower transfer is cut off as too_slow (0: off)
    throughput_grace: float = 3.0  # seconds of transfer before min_throughput is enforced
    max_redirects: int = 5
    retries: int = 2  # extra attempts for retryable failures (DNS, timeout, reset, 429, 5xx)
    backoff_base: float = 0.5  # seconds; attempt n waits a random time in [0, base * 2**n]
    backoff_max: float = 8.0  # seconds, cap on one backoff wait
    # Seconds. A longer Retry-After ends the fetch instead of waiting, and the pause that a
    # Retry-After sets for every URL of its host lasts at most this long.
    max_retry_after: float = 20.0
    user_agent: str = DEFAULT_USER_AGENT
    # CIDRs exempt from the SSRF guard, e.g. ("127.0.0.0/8",) for a loopback test server.
    allow_networks: tuple[str, ...] = ()
    respect_opt_out: bool = True  # reject on X-Robots-Tag noai/noimageai/noindex/noimageindex/none
    check_robots_txt: bool = False  # fetch and obey robots.txt per host (cached)
    host_concurrency: int = 8  # simultaneous requests per host (0: no cap)
    host_rate: float = 0.0  # requests per second per host, token bucket (0: no limit)
    host_burst: float = 4.0  # token-bucket size for host_rate
    max_connections: int = 0  # simultaneous requests over all hosts (0: no cap)
    host_wait: float = 120.0  # seconds a URL may wait for its host's politeness slot
    breaker_failures: int = 8  # consecutive host failures that open its circuit (0: off)
    breaker_cooldown: float = 60.0  # seconds a host's circuit stays open
    dns_cache_ttl: float = 300.0  # seconds a successful lookup is reused
    # Simultaneous DNS lookups per fetcher. A lookup that outlives its fetch's deadline keeps its
    # slot until the resolver returns, so stuck lookups can use up the slots.
    dns_concurrency: int = 32
    keep_alive: bool = True  # reuse connections to the same checked address


@dataclasses.dataclass
class FetchResult:
    url: str
    body: bytes | None = None
    status: int | None = None
    content_type: str | None = None
    reason: str | None = None  # a reject reason code when the fetch failed
    detail: str = ""
    final_url: str | None = None  # after redirects
    image_format: str | None = None  # sniffed from the first bytes of the body
    attempts: int = 0
    retry_after: float | None = None  # seconds, from the last 429/503 response

    @property
    def ok(self) -> bool:
        return self.reason is None


class BlockedAddress(Exception):
    pass


class InvalidHost(ValueError):
    pass


# ---------------------------------------------------------------- SSRF guard


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


_IPV4_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


def parse_ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """Parse ``host`` the way inet_aton and the WHATWG URL standard read IPv4 hosts, or return None.

    Accepts one to four parts, each decimal, octal (leading 0) or hex (0x); the last part fills
    the remaining bytes, so "2130706433", "0177.0.0.1", "0x7f.1" and "127.1" all mean 127.0.0.1.
    Raises InvalidHost when the host looks numeric but is out of range or malformed.
    """
    labels = host.split(".")
    if labels and labels[-1] == "" and len(labels) > 1:
        labels = labels[:-1]
    if not labels or not _IPV4_PART.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_IPV4_PART.match(label) for label in labels):
        raise InvalidHost(f"{host!r} is not a valid IPv4 address")
    numbers = []
    for label in labels:
        if label[:2].lower() == "0x":
            numbers.append(int(label[2:] or "0", 16))
        elif len(label) > 1 and label.startswith("0"):
            if any(c in "89" for c in label):
                raise InvalidHost(f"{host!r} has an invalid octal part {label!r}")
            numbers.append(int(label, 8))
        else:
            numbers.append(int(label))
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        raise InvalidHost(f"{host!r} is out of the IPv4 range")
    value = last
    for i, n in enumerate(leading):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def parse_ip_literal(host: str) -> IPAddress | None:
    """Return the address when ``host`` is an IP literal in any accepted spelling, else None."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError as err:
            raise InvalidHost(f"{host!r} is not a valid IPv6 address") from err
    return parse_ipv4_literal(host)


# Characters that cannot appear in a host name or IPv4 literal: the WHATWG URL standard's
# forbidden domain code points (controls, space, "%" and delimiters) that urlsplit leaves in the
# host, plus '"', "`", "{" and "}", which no DNS name contains either.
_FORBIDDEN_HOST_CHARACTER = re.compile(r'[\x00-\x20\x7f"#%/<>?@\\^`{|}]')


_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Return IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _IPV4_COMPATIBLE or any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


# Non-public ranges that some Python versions' ipaddress tables call global (3.11.7 does for the
# two IPv6 ranges and most of 192.0.0.0/24), so the guard does not depend on the patch level.
_EXTRA_BLOCKED = (
    ipaddress.IPv4Network("192.0.0.0/24"),  # IETF protocol assignments (RFC 6890)
    ipaddress.IPv6Network("fec0::/10"),  # deprecated site-local addresses (RFC 3879)
    ipaddress.IPv6Network("3fff::/20"),  # documentation (RFC 9637)
)


def is_blocked_ip(ip: IPAddress) -> bool:
    """Return True for addresses a public crawler must not reach.

    Blocked: loopback, private, link-local (169.254.0.0/16 holds cloud metadata endpoints),
    multicast, reserved, unspecified, shared (100.64.0.0/10) and every other range Python's
    ``ipaddress`` does not call global, the ``_EXTRA_BLOCKED`` ranges, and IPv6 addresses whose
    embedded IPv4 is blocked.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if any(is_blocked_ip(v4) for v4 in embedded_ipv4(ip)):
            return True
    if any(ip.version == network.version and ip in network for network in _EXTRA_BLOCKED):
        return True
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

    def check(self, address: str | IPAddress) -> None:
        ip = address if not isinstance(address, str) else ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip.version == network.version and ip in network for network in self.allow):
            return
        if is_blocked_ip(ip):
            raise BlockedAddress(f"{ip} is a non-public address")


# ---------------------------------------------------------------- connections and deadlines


class _Deadline:
    """A fetch deadline the watchdog enforces by shutting down the fetch's current socket."""

    def __init__(self, at: float):
        self.at = at
        self.sock: socket.socket | None = None
        self.fired = False
        self.done = False
        self.lock = threading.Lock()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def attach(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock
            if self.fired and sock is not None:
                _shutdown(sock)

    def fire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.fired = True
            if self.sock is not None:
                _shutdown(self.sock)

    def finish(self) -> None:
        with self.lock:
            self.done = True
            self.sock = None


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Watchdog:
    """One daemon thread that fires deadlines in time order."""

    def __init__(self):
        self.heap: list[tuple[float, int, _Deadline]] = []
        self.counter = itertools.count()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def watch(self, deadline: _Deadline) -> None:
        with self.cond:
            earliest = self.heap[0][0] if self.heap else None
            heapq.heappush(self.heap, (deadline.at, next(self.counter), deadline))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="bm6b-fetch-watchdog", daemon=True)
                self.thread.start()
            # Waking the thread costs a GIL handoff per fetch; only an earlier deadline needs it.
            if earliest is None or deadline.at < earliest:
                self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.heap:
                    self.cond.wait()
                at, _, deadline = self.heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self.cond.wait(wait)
                    continue
                heapq.heappop(self.heap)
            deadline.fire()


_WATCHDOG = _Watchdog()


def _open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """Connect a TCP socket to an already-checked literal address (no name lookup happens here)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


# Informational (1xx) responses skipped before the final response. RFC 9110 section 15.2 sets no
# limit. This one is a chosen bound, so a server that sends 1xx responses without end gets http_error.
MAX_INFORMATIONAL_RESPONSES = 10


class _FinalResponse(http.client.HTTPResponse):
    """An HTTP response that skips every informational (1xx) response except 101 Switching Protocols.

    Python 3.11's ``HTTPResponse.begin`` skips only ``100 Continue`` and returns any other 1xx,
    such as ``103 Early Hints``, as if it were the final response. 101 is kept because it ends
    HTTP/1.1 on the connection, so no final response follows it. NOTE: this overrides the private
    ``_read_status``, whose contract was read in the CPython 3.11.7 source.
    """

    def _read_status(self):
        for _ in range(MAX_INFORMATIONAL_RESPONSES + 1):
            version, status, reason = super()._read_status()
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            # parse_headers applies http.client's limits on header line length and count.
            http.client.parse_headers(self.fp)
        raise _Failure(
            Reason.HTTP_ERROR, f"more than {MAX_INFORMATIONAL_RESPONSES} informational (1xx) responses without a final response"
        )


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a fixed, pre-checked address; ``host`` only fills the Host header."""

    response_class = _FinalResponse

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self.connect_timeout = timeout
        self.deadline: _Deadline | None = None

    def _raw_socket(self) -> socket.socket:
        sock = _open_socket(self._address, self.port, self.connect_timeout)
        if self.deadline is not None:
            self.deadline.attach(sock)
        return sock

    def connect(self) -> None:
        self.sock = self._raw_socket()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """TLS to the pinned address, with SNI and certificate checks against ``host``, not the address."""

    default_port = 443

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, address, timeout)
        self._context = ssl.create_default_context()

    def connect(self) -> None:
        self.sock = self._context.wrap_socket(self._raw_socket(), server_hostname=self.host)
        if self.deadline is not None:
            # wrap_socket detached the raw socket; the watchdog must shut down the TLS one.
            self.deadline.attach(self.sock)


def _has_unread_input(conn: _PinnedHTTPConnection) -> bool:
    """Return True when an idle connection's socket is readable, so it must not be reused.

    An idle connection has no request in flight, so readable means the server closed it or sent
    bytes beyond the last response, such as a body longer than its Content-Length. Reusing it
    would read those bytes as the response to the next request. NOTE: bytes that arrive after this
    check can still desynchronize the connection; only hosts that send them are affected.
    """
    sock = conn.sock
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _ConnectionPool:
    """Idle keep-alive connections keyed by (scheme, host, port, checked address)."""

    def __init__(self, max_idle_per_key: int):
        self.max_idle = max(1, max_idle_per_key)
        self.idle: dict[tuple, list[_PinnedHTTPConnection]] = {}
        self.lock = threading.Lock()

    def get(self, key: tuple) -> _PinnedHTTPConnection | None:
        """Return an idle connection for ``key`` that is safe to reuse, closing any that are not."""
        while True:
            with self.lock:
                conns = self.idle.get(key)
                conn = conns.pop() if conns else None
            if conn is None or not _has_unread_input(conn):
                return conn
            conn.close()

    def put(self, key: tuple, conn: _PinnedHTTPConnection) -> None:
        with self.lock:
            conns = self.idle.setdefault(key, [])
            if len(conns) < self.max_idle:
                conns.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self.lock:
            conns = [c for group in self.idle.values() for c in group]
            self.idle.clear()
        for conn in conns:
            conn.close()


# ---------------------------------------------------------------- the fetcher


@dataclasses.dataclass
class _Hop:
    """The outcome of one request: a final result, or a redirect to follow."""

    result: FetchResult
    location: str | None = None


class _Failure(Exception):
    def __init__(self, reason: Reason, detail: str, status: int | None = None):
        super().__init__(detail)
        self.reason = reason.value
        self.detail = detail
        self.status = status


_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def _request_target(parts: urllib.parse.SplitResult) -> str:
    """Return the path and query, percent-encoding characters HTTP does not allow raw."""
    path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        return f"{path}?{urllib.parse.quote(parts.query, safe=_QUERY_SAFE)}"
    return path


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Return the seconds a ``Retry-After`` value requests (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def status_reason(status: int) -> str:
    if status == 404:
        return Reason.HTTP_404.value
    if status == 429:
        return Reason.HTTP_429.value
    if 500 <= status < 600:
        return Reason.HTTP_5XX.value
    return Reason.HTTP_ERROR.value


def _deflate_decoder(head: bytes):
    """Return a decompressor for a "deflate" body that starts with ``head``.

    RFC 9110 defines "deflate" as a zlib stream, but some servers send raw deflate data without
    the zlib header. A valid zlib header (RFC 1950: compression method 8, and the two header
    bytes as a big-endian number a multiple of 31) selects the zlib format.
    """
    if len(head) >= 2 and head[0] & 0x0F == 8 and ((head[0] << 8) | head[1]) % 31 == 0:
        return zlib.decompressobj()
    return zlib.decompressobj(-zlib.MAX_WBITS)


class Fetcher:
    """Fetch image URLs safely; one instance is shared by many threads of one worker."""

    def __init__(
        self,
        config: FetchConfig | None = None,
        resolver: Resolver | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.config = cfg = config or FetchConfig()
        self.resolver = resolver or system_resolver
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.guard = AddressGuard(cfg.allow_networks)
        self.limiter = HostLimiter(cfg.host_concurrency, cfg.host_rate, cfg.host_burst, cfg.max_connections)
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown)
        self.pool = _ConnectionPool(cfg.host_concurrency or 8)
        self.ua_token = user_agent_token(cfg.user_agent)
        self.robots = RobotsCache(self._fetch_robots, cfg.user_agent) if cfg.check_robots_txt else None
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._dns_locks: dict[tuple[str, int], threading.Lock] = {}
        self._dns_lock = threading.Lock()
        self._lookup_slots = threading.BoundedSemaphore(max(1, cfg.dns_concurrency))
        # The latest lookup of each (host, port) until it has finished, so that a lookup which
        # outlived one fetch's deadline is waited for by the next fetch, not started again.
        self._lookups: dict[tuple[str, int], concurrent.futures.Future] = {}

    def close(self) -> None:
        self.pool.close()

    # -------------------------------------------------------- public entry point

    def fetch(self, url: str) -> FetchResult:
        cfg = self.config
        deadline: _Deadline | None = None
        attempt = 0
        try:
            while True:
                attempt += 1
                result, deadline = self._fetch_redirects(url, deadline)
                result.url = url
                result.attempts = attempt
                if result.ok or result.reason not in _RETRY_IN_FETCH or attempt > cfg.retries:
                    return result
                wait = self._backoff(attempt, result.retry_after)
                if wait is None or deadline is None or wait >= deadline.remaining():
                    result.detail += "; no retry: the wait would pass the deadline or max_retry_after"
                    return result
                logger.debug("retrying %s in %.2fs after %s (%s)", url, wait, result.reason, result.detail)
                self.sleep(wait)
        finally:
            if deadline is not None:
                deadline.finish()

    def _backoff(self, attempt: int, retry_after: float | None) -> float | None:
        cfg = self.config
        wait = self.rng.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2 ** (attempt - 1)))
        if retry_after is not None:
            if retry_after > cfg.max_retry_after:
                return None
            wait = max(wait, retry_after)
        return wait

    # -------------------------------------------------------- redirects

    def _fetch_redirects(self, url: str, deadline: _Deadline | None) -> tuple[FetchResult, _Deadline | None]:
        current = url
        for _ in range(self.config.max_redirects + 1):
            hop, deadline = self._fetch_hop(current, deadline)
            if hop.location is None:
                hop.result.final_url = current
                return hop.result, deadline
            try:
                current = urllib.parse.urljoin(current, hop.location)
            except ValueError as err:
                detail = f"invalid redirect Location {hop.location[:200]!r}: {err}"
                return FetchResult(url, status=hop.result.status, reason=Reason.INVALID_URL.value, detail=detail), deadline
        return (
            FetchResult(url, reason=Reason.TOO_MANY_REDIRECTS.value, detail=f"more than {self.config.max_redirects} redirects, last {current}"),
            deadline,
        )

    # -------------------------------------------------------- one request

    def _target(self, url: str, timeout: float) -> tuple[urllib.parse.SplitResult, str, int, str]:
        """Validate a URL and return (parts, host, port, checked address); raises _Failure.

        ``timeout`` bounds the DNS lookup in seconds.
        """
        parts, host, port = self._split(url)
        return parts, host, port, self._address(host, port, timeout)

    def _split(self, url: str) -> tuple[urllib.parse.SplitResult, str, int]:
        """Validate a URL's scheme and host and return (parts, host, port); raises _Failure."""
        try:
            parts = urllib.parse.urlsplit(url.strip())
        except ValueError as err:
            raise _Failure(Reason.INVALID_URL, f"{url[:200]!r}: {err}") from err
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _Failure(Reason.UNSUPPORTED_SCHEME, f"scheme {parts.scheme!r} in {url[:200]!r}")
        try:
            host = parts.hostname
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as err:
            raise _Failure(Reason.INVALID_URL, str(err)) from err
        if not host:
            raise _Failure(Reason.INVALID_URL, f"no host in {url[:200]!r}")
        # IPv6 literals were checked by urlsplit and may carry a zone such as "%25eth0".
        if ":" not in host and _FORBIDDEN_HOST_CHARACTER.search(host):
            raise _Failure(Reason.INVALID_URL, f"{host[:200]!r}: invalid character in host name")
        return parts, host, port

    def _address(self, host: str, port: int, timeout: float) -> str:
        """Resolve ``host`` unless it is an IP literal, check every address and return the first.

        ``timeout`` bounds the DNS lookup in seconds.
        """
        try:
            # IDNA maps fullwidth digits and dots and the ideographic full stop to ASCII, so
            # "１２７。０。０。１" is the literal 127.0.0.1 and never goes to the resolver.
            literal = parse_ip_literal(host if host.isascii() else host.encode("idna").decode("ascii"))
        except UnicodeError as err:
            raise _Failure(Reason.INVALID_URL, f"{host!r}: invalid host name ({err})") from err
        except InvalidHost as err:
            raise _Failure(Reason.INVALID_URL, str(err)) from err
        if literal is not None:
            addresses = [str(literal)]
        else:
            addresses = self._resolve(host, port, timeout)

        for address in addresses:
            try:
                self.guard.check(address)
            except (BlockedAddress, ValueError) as err:
                raise _Failure(Reason.BLOCKED_ADDRESS, f"{host}: {err}") from err
        return addresses[0]

    def _resolve(self, host: str, port: int, timeout: float) -> list[str]:
        """Return the addresses of ``host``, waiting at most ``timeout`` seconds; raises _Failure.

        A lookup that does not finish in time ends with the ``dns`` reason, not ``timeout``: the
        name server, not the web server, failed, and the rejects table keeps the two apart. Both
        reasons count towards the host's circuit breaker.
        """
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError as err:
            raise _Failure(Reason.INVALID_URL, f"{host!r}: invalid host name ({err})") from err
        started = time.monotonic()
        key = (host, port)
        with self._dns_lock:
            lock = self._dns_locks.setdefault(key, threading.Lock())
        # One lookup per host at a time: a burst of URLs on one host makes one DNS query.
        if not lock.acquire(timeout=max(0.0, timeout)):
            self.breaker.record_failure(host)
            raise _Failure(Reason.DNS, f"{host}: lookup timed out after {timeout:.1f}s (waiting for another lookup of the host)")
        future = None
        try:
            cached = self._dns.get(key)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            # Threads queued behind failed lookups of this host stop here once its circuit is open.
            self._check_circuit(host)
            future = self._lookups.get(key)
            try:
                if future is None or future.done():
                    future = self._lookups[key] = self._start_lookup(ascii_host, port, timeout - (time.monotonic() - started))
                addresses = future.result(timeout=max(0.0, timeout - (time.monotonic() - started)))
            except UnicodeError as err:
                raise _Failure(Reason.INVALID_URL, f"{host!r}: invalid host name ({err})") from err
            except TimeoutError as err:
                # TimeoutError is a subclass of OSError, so it must be caught first.
                self.breaker.record_failure(host)
                cause = f" ({err})" if str(err) else ""
                raise _Failure(Reason.DNS, f"{host}: lookup timed out after {timeout:.1f}s{cause}") from err
            except OSError as err:
                self.breaker.record_failure(host)
                raise _Failure(Reason.DNS, f"{host}: {err}") from err
            if not addresses:
                self.breaker.record_failure(host)
                raise _Failure(Reason.DNS, f"{host}: no address")
            self._dns[key] = (time.monotonic() + self.config.dns_cache_ttl, addresses)
            return addresses
        finally:
            if future is not None and future.done():
                self._lookups.pop(key, None)
            lock.release()

    def _start_lookup(self, host: str, port: int, timeout: float) -> concurrent.futures.Future:
        """Start the resolver on a daemon thread and return the future of its addresses.

        ``socket.getaddrinfo`` has no timeout of its own, so callers wait on the future with one.
        The thread is a daemon, so a resolver that never returns cannot keep the process from
        exiting. Raises TimeoutError when no lookup slot frees up within ``timeout`` seconds.
        """
        if not self._lookup_slots.acquire(timeout=max(0.0, timeout)):
            raise TimeoutError(f"all {self.config.dns_concurrency} lookup slots are busy")
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(self.resolver(host, port))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(err)
            finally:
                self._lookup_slots.release()

        threading.Thread(target=run, name=f"bm6b-dns-{host}", daemon=True).start()
        return future

    def _check_circuit(self, host: str) -> None:
        """Raise _Failure(HOST_FAILING) while the host's circuit breaker is open."""
        open_for = self.breaker.open_for(host)
        if open_for > 0:
            detail = f"{host}: {self.breaker.failures_of(host)} consecutive failures; circuit open for {open_for:.0f}s more"
            raise _Failure(Reason.HOST_FAILING, detail)

    def _fetch_hop(self, url: str, deadline: _Deadline | None) -> tuple[_Hop, _Deadline | None]:
        cfg = self.config
        # Before the first request slot there is no deadline yet. The first lookup may use the
        # whole budget, and its time is taken off the deadline that starts with the slot.
        lookup_started = time.monotonic()
        lookup_budget = cfg.deadline if deadline is None else max(0.0, deadline.remaining())
        try:
            parts, host, port = self._split(url)
            # The circuit is checked before the DNS lookup, so a host whose name server keeps
            # failing or timing out costs no more lookups while it is open.
            self._check_circuit(host)
            address = self._address(host, port, lookup_budget)
        except _Failure as failure:
            return _Hop(FetchResult(url, reason=failure.reason, detail=failure.detail)), deadline

        lookup_seconds = time.monotonic() - lookup_started
        if self.robots is not None:
            answer = self.robots.check(url)
            if not answer.allowed:
                return _Hop(FetchResult(url, reason=answer.reason, detail=answer.detail)), deadline

        wait = cfg.host_wait if deadline is None else max(0.0, deadline.remaining())
        try:
            with self.limiter.slot(host, wait):
                if deadline is None:
                    deadline = _Deadline(time.monotonic() + cfg.deadline - lookup_seconds)
                    _WATCHDOG.watch(deadline)
                hop = self._request(url, parts, host, port, address, deadline)
        except HostBusy as err:
            return _Hop(FetchResult(url, reason=Reason.TIMEOUT.value, detail=str(err))), deadline

        if hop.result.retry_after is not None:
            # The server's Retry-After holds back every URL of the host, not only this one.
            # The cap is max_retry_after, the longest wait this URL itself accepts before a
            # retry. A smaller cap would let other URLs reach the host while this one still waits.
            pause = min(hop.result.retry_after, cfg.max_retry_after)
            self.limiter.pause(host, pause)
            logger.debug("pausing requests to %s for %.1fs after HTTP %s with Retry-After", host, pause, hop.result.status)

        reason = hop.result.reason
        if reason in _HOST_FAILURES:
            self.breaker.record_failure(host)
        elif hop.result.status is not None:
            self.breaker.record_success(host)
        return hop, deadline

    def _request(
        self, url, parts, host, port, address, deadline: _Deadline, *, body_cap=None, sniff=True, truncate=False, fresh=False
    ) -> _Hop:
        scheme = parts.scheme.lower()
        key = (scheme, host, port, address)
        conn = self.pool.get(key) if self.config.keep_alive and not fresh else None
        reused = conn is not None
        if conn is None:
            conn_cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
            conn = conn_cls(host, port, address, timeout=self.config.connect_timeout)
        conn.deadline = deadline
        deadline.attach(conn.sock)
        keep = False
        try:
            hop, keep = self._exchange(url, parts, conn, deadline, body_cap=body_cap, sniff=sniff, truncate=truncate)
            return hop
        except _Failure as failure:
            return _Hop(FetchResult(url, status=failure.status, reason=failure.reason, detail=failure.detail))
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as err:
            if reused and not deadline.fired:
                # The server closed an idle keep-alive connection, which tells nothing about the URL.
                conn.close()
                return self._request(
                    url, parts, host, port, address, deadline, body_cap=body_cap, sniff=sniff, truncate=truncate, fresh=True
                )
            return _Hop(self._error_result(url, err, deadline))
        except (OSError, http.client.HTTPException, ValueError) as err:
            return _Hop(self._error_result(url, err, deadline))
        finally:
            deadline.attach(None)
            conn.deadline = None
            if keep and not deadline.fired:
                self.pool.put(key, conn)
            else:
                conn.close()

    def _error_result(self, url: str, err: BaseException, deadline: _Deadline) -> FetchResult:
        if deadline.fired:
            return FetchResult(url, reason=Reason.TIMEOUT.value, detail=f"deadline of {self.config.deadline}s passed")
        if isinstance(err, (socket.timeout, TimeoutError)):
            return FetchResult(url, reason=Reason.TIMEOUT.value, detail=str(err) or "timed out")
        if isinstance(err, (ConnectionResetError, http.client.IncompleteRead, http.client.RemoteDisconnected, BrokenPipeError)):
            return FetchResult(url, reason=Reason.RESET.value, detail=f"{type(err).__name__}: {err}")
        if isinstance(err, (ConnectionRefusedError, ssl.SSLError)):
            return FetchResult(url, reason=Reason.CONNECT.value, detail=f"{type(err).__name__}: {err}")
        if isinstance(err, (http.client.InvalidURL, UnicodeError)):
            return FetchResult(url, reason=Reason.INVALID_URL.value, detail=f"{type(err).__name__}: {err}")
        if isinstance(err, (http.client.HTTPException, ValueError)):
            detail = f"malformed response: {type(err).__name__}: {str(err).strip()[:200]}"
            return FetchResult(url, reason=Reason.HTTP_ERROR.value, detail=detail)
        return FetchResult(url, reason=Reason.CONNECT.value, detail=f"{type(err).__name__}: {err}")

    def _exchange(self, url, parts, conn, deadline: _Deadline, *, body_cap, sniff, truncate) -> tuple[_Hop, bool]:
        """Send the request and read the response; returns the hop and whether the connection can be reused.

        With ``truncate``, a body larger than the cap is cut at the cap instead of failing as too_large.
        """
        cfg = self.config
        if deadline.remaining() <= 0:
            raise _Failure(Reason.TIMEOUT, f"deadline of {cfg.deadline}s passed")
        conn.connect_timeout = max(0.001, min(cfg.connect_timeout, deadline.remaining()))
        if conn.sock is None:
            conn.connect()
        # getresponse() drops conn.sock when the server announces Connection: close; keep our own handle.
        sock = conn.sock
        sock.settimeout(max(0.001, min(cfg.timeout, deadline.remaining())))

        headers = {"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
        conn.request("GET", _request_target(parts), headers=headers)
        response = conn.getresponse()
        status = response.status
        content_type = response.getheader("Content-Type")
        result = FetchResult(url, status=status, content_type=content_type)

        if status in (301, 302, 303, 307, 308):
            location = response.getheader("Location")
            if not location:
                raise _Failure(Reason.HTTP_ERROR, f"HTTP {status} without Location", status)
            keep = self._drain(response, 64 * 1024)
            return _Hop(result, location), keep
        if status != 200:
            result.reason = status_reason(status)
            result.detail = f"HTTP {status}"
            if status in (429, 503):
                result.retry_after = parse_retry_after(response.getheader("Retry-After"))
                if result.retry_after is not None:
                    result.detail += f", Retry-After {result.retry_after:.0f}s"
            return _Hop(result), self._drain(response, 64 * 1024)

        if sniff and cfg.respect_opt_out:
            directive = x_robots_opt_out(response.headers.get_all("X-Robots-Tag") or [], self.ua_token)
            if directive:
                result.reason = Reason.OPTED_OUT.value
                result.detail = f"X-Robots-Tag: {directive}"
                return _Hop(result), False

        # RFC 9112 section 6.3: a Content-Length that is not one decimal value, or a list of equal
        # ones, makes the framing of the response unrecoverable. http.client would use the first
        # header, or read until the server closes the connection when the value is not a number.
        lengths = {part.strip() for value in response.headers.get_all("Content-Length") or [] for part in value.split(",")}
        if len(lengths) > 1 or not all(length.isdigit() for length in lengths):
            raise _Failure(Reason.HTTP_ERROR, f"invalid Content-Length {sorted(lengths)}", status)
        cap = body_cap or cfg.max_bytes
        length = response.getheader("Content-Length")
        if not truncate and length and length.strip().isdigit() and int(length) > cap:
            raise _Failure(Reason.TOO_LARGE, f"Content-Length {length} > {cap} bytes", status)

        result.body, complete = self._read_body(response, sock, cap, deadline, sniff, truncate, status)
        response.close()
        if sniff:
            result.image_format = sniff_image_format(result.body[:SNIFF_BYTES])
            if not result.body:
                raise _Failure(Reason.EMPTY_BODY, f"0-byte body (Content-Type {content_type})", status)
            if result.image_format is None:
                what = describe_non_image(result.body[:512])
                raise _Failure(Reason.NOT_AN_IMAGE, f"body is {what} (Content-Type {content_type})", status)
        return _Hop(result), complete and not response.will_close

    def _read_body(self, response, sock, cap: int, deadline: _Deadline, sniff: bool, truncate: bool, status: int) -> tuple[bytes, bool]:
        """Read the body up to ``cap`` bytes; return it and whether it was read to its end."""
        cfg = self.config
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding in ("deflate", "identity"):
            decoder = None  # a deflate decoder is chosen from the first bytes of the body
        else:
            raise _Failure(Reason.HTTP_ERROR, f"unsupported Content-Encoding {encoding!r}", status)

        chunks: list[bytes] = []
        size = 0
        started = time.monotonic()
        sniffed = not sniff
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise _Failure(Reason.TIMEOUT, f"deadline of {cfg.deadline}s passed after {size} bytes", status)
            sock.settimeout(max(0.001, min(cfg.timeout, remaining)))
            chunk = response.read1(READ_CHUNK)
            if not chunk:
                break
            if decoder is None and encoding == "deflate":
                decoder = _deflate_decoder(chunk)
            if decoder is not None:
                # max_length keeps a compression bomb from expanding past the cap in memory.
                try:
                    chunk = decoder.decompress(chunk, cap + 1 - size)
                except zlib.error as err:
                    raise _Failure(Reason.HTTP_ERROR, f"invalid {encoding} body: {err}", status) from err
                if decoder.unconsumed_tail and not truncate:
                    raise _Failure(Reason.TOO_LARGE, f"{encoding} body expands past {cap} bytes", status)
            if truncate and size + len(chunk) > cap:
                chunks.append(chunk[: cap - size])
                return b"".join(chunks), False
            size += len(chunk)
            if size > cap:
                raise _Failure(Reason.TOO_LARGE, f"body larger than {cap} bytes", status)
            chunks.append(chunk)

            if not sniffed and size >= SNIFF_BYTES:
                head = b"".join(chunks)[:SNIFF_BYTES]
                if sniff_image_format(head) is None:
                    raise _Failure(Reason.NOT_AN_IMAGE, f"body is {describe_non_image(b''.join(chunks)[:512])}", status)
                sniffed = True

            elapsed = time.monotonic() - started
            if cfg.min_throughput > 0 and elapsed > cfg.throughput_grace and size / elapsed < cfg.min_throughput:
                raise _Failure(
                    Reason.TOO_SLOW, f"{size} bytes in {elapsed:.1f}s, below {cfg.min_throughput:.0f} B/s", status
                )
        if deadline.fired:
            raise _Failure(Reason.TIMEOUT, f"deadline of {cfg.deadline}s passed after {size} bytes", status)
        if response.length:
            # http.client reports an early EOF on a Content-Length body as a short read, not an error.
            raise _Failure(Reason.RESET, f"connection closed after {size} of {size + response.length} bytes", status)
        if decoder is not None:
            try:
                tail = decoder.flush()
            except zlib.error as err:
                raise _Failure(Reason.HTTP_ERROR, f"invalid {encoding} body: {err}", status) from err
            if truncate and size + len(tail) > cap:
                chunks.append(tail[: cap - size])
                return b"".join(chunks), False
            size += len(tail)
            if size > cap:
                raise _Failure(Reason.TOO_LARGE, f"body larger than {cap} bytes", status)
            chunks.append(tail)
        return b"".join(chunks), True

    def _drain(self, response, limit: int) -> bool:
        """Read and drop a small error or redirect body so the connection can be reused."""
        length = response.getheader("Content-Length")
        if response.will_close or not (length and length.isdigit() and int(length) <= limit):
            return False
        response.read()
        return True

    # -------------------------------------------------------- robots.txt

    def _fetch_robots(self, robots_url: str):
        """Fetch robots.txt through the same guard and pinning, without image sniffing.

        A body longer than ROBOTS_MAX_BYTES is cut there: RFC 9309 requires crawlers to parse at
        least 500 KiB, and a longer file must not fail every URL of its host.
        """
        cfg = self.config
        deadline = _Deadline(time.monotonic() + min(cfg.deadline, 15.0))
        _WATCHDOG.watch(deadline)
        try:
            current = robots_url
            for _ in range(cfg.max_redirects + 1):
                try:
                    parts, host, port, address = self._target(current, max(0.0, deadline.remaining()))
                except _Failure as failure:
                    return None, None, failure.reason, failure.detail
                hop = self._request(current, parts, host, port, address, deadline, body_cap=ROBOTS_MAX_BYTES, sniff=False, truncate=True)
                if hop.location is None:
                    result = hop.result
                    if result.status is None or (result.reason and result.reason == Reason.TOO_LARGE.value):
                        return None, None, result.reason, result.detail
                    return result.status, result.body, result.reason, result.detail
                try:
                    current = urllib.parse.urljoin(current, hop.location)
                except ValueError as err:
                    return None, None, Reason.INVALID_URL.value, f"invalid redirect Location {hop.location[:200]!r}: {err}"
            return 404, None, None, "too many redirects; treated as no robots.txt"
        finally:
            deadline.finish()

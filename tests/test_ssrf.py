"""The fetcher's SSRF guard: blocked addresses are rejected before any socket connects to them."""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse

import pytest

from bm6b.filters.download import AddressGuard, BlockedAddress, Fetcher, FetchConfig, parse_ip_literal
from tests.download_servers import HostileServer, make_jpeg


class RecordingResolver:
    """A resolver from a fixed table; records every lookup. Unknown names fail like NXDOMAIN."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


@pytest.fixture
def connects(monkeypatch):
    """Record every socket connect and system DNS lookup made during the test."""
    seen: list = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def recording_connect(sock, address):
        seen.append(("connect", address))
        return real_connect(sock, address)

    def recording_getaddrinfo(host, *args, **kwargs):
        seen.append(("getaddrinfo", host))
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda sock, address: seen.append(("connect_ex", address)) or 111)
    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    return seen


BLOCKED_LITERALS = [
    # IPv4 ranges
    "http://127.0.0.1/a.jpg",
    "http://127.255.255.254/a.jpg",
    "http://10.0.0.1/a.jpg",
    "http://172.16.0.1/a.jpg",
    "http://172.31.255.255/a.jpg",
    "http://192.168.1.1/a.jpg",
    "http://169.254.169.254/latest/meta-data/",  # AWS, GCP and Azure instance metadata
    "http://100.64.0.1/a.jpg",  # shared address space (carrier-grade NAT)
    "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud metadata, in 100.64.0.0/10
    "http://0.0.0.0/a.jpg",
    "http://224.0.0.1/a.jpg",
    "http://239.255.255.250/a.jpg",
    "http://240.0.0.1/a.jpg",
    "http://255.255.255.255/a.jpg",
    "http://192.0.0.170/a.jpg",
    "http://192.0.2.1/a.jpg",
    "http://198.18.0.1/a.jpg",
    "http://198.51.100.1/a.jpg",
    "http://203.0.113.1/a.jpg",
    # other IPv4 spellings of 127.0.0.1, 10.0.0.1 and 169.254.169.254
    "http://2130706433/a.jpg",
    "http://0177.0.0.1/a.jpg",
    "http://0177.0000.0000.0001/a.jpg",
    "http://0x7f000001/a.jpg",
    "http://0x7f.0.0.1/a.jpg",
    "http://0x7F.1/a.jpg",
    "http://127.1/a.jpg",
    "http://127.0.1/a.jpg",
    "http://127.0.0.1./a.jpg",
    "http://012.0.0.1/a.jpg",
    "http://167772161/a.jpg",
    "http://2852039166/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://0251.0376.0251.0376/latest/meta-data/",
    "http://0/a.jpg",
    # IDNA maps fullwidth digits and dots, and the ideographic full stop, to ASCII before resolving
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/a.jpg",
    "http://127\u30020\u30020\u30021/a.jpg",
    "http://127\uff0e0\uff0e0\uff0e1/a.jpg",
    "http://169\u3002254\u3002169\u3002254/latest/meta-data/",
    "http://127.0.0.1:8080/a.jpg",
    "http://user:pass@127.0.0.1/a.jpg",
    "https://127.0.0.1/a.jpg",
    # IPv6 forms
    "http://[::1]/a.jpg",
    "http://[0:0:0:0:0:0:0:1]/a.jpg",
    "http://[::]/a.jpg",
    "http://[fe80::1]/a.jpg",
    "http://[fe80::1%25eth0]/a.jpg",
    "http://[fc00::1]/a.jpg",
    "http://[fd00:ec2::254]/latest/meta-data/",  # AWS IPv6 metadata
    "http://[ff02::1]/a.jpg",
    "http://[2001:db8::1]/a.jpg",
    "http://[fec0::1]/a.jpg",  # deprecated site-local, which Python 3.11.7's ipaddress calls global
    "http://[3fff::1]/a.jpg",  # documentation prefix of 2024, unknown to Python 3.11.7
    "http://192.0.0.8/a.jpg",  # IETF protocol assignments, global in Python 3.11.7 outside 192.0.0.0/29
    "http://[::ffff:127.0.0.1]/a.jpg",
    "http://[::ffff:7f00:1]/a.jpg",
    "http://[::ffff:169.254.169.254]/a.jpg",
    "http://[::127.0.0.1]/a.jpg",  # IPv4-compatible (deprecated form)
    "http://[64:ff9b::a9fe:a9fe]/a.jpg",  # NAT64 of 169.254.169.254
    "http://[64:ff9b::7f00:1]/a.jpg",  # NAT64 of 127.0.0.1
    "http://[2002:7f00:1::]/a.jpg",  # 6to4 of 127.0.0.1
    "http://[2002:a00:1::1]/a.jpg",  # 6to4 of 10.0.0.1
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/a.jpg",  # Teredo, client 127.0.0.1
]


@pytest.mark.parametrize("url", BLOCKED_LITERALS)
def test_blocked_literal_refused_without_connect(url, connects):
    resolver = RecordingResolver({})
    fetcher = Fetcher(FetchConfig(retries=0), resolver=resolver)

    result = fetcher.fetch(url)

    assert result.reason == "blocked_address", (url, result.reason, result.detail)
    assert connects == []
    assert resolver.calls == []  # literals are parsed, never sent to a resolver


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("8.8.8.8.", "8.8.8.8"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
    ],
)
def test_ip_spellings_parse_like_inet_aton(spelling, expected):
    assert parse_ip_literal(spelling) == ipaddress.ip_address(expected)


@pytest.mark.parametrize("host", ["example.com", "1.2.3.example", "0x7f.example", "images.1a"])
def test_hostnames_are_not_ip_literals(host):
    assert parse_ip_literal(host) is None


@pytest.mark.parametrize("url", ["http://256.0.0.1/", "http://1.2.3.4.5/", "http://08.0.0.1/", "http://4294967296/", "http://[::1::2]/"])
def test_malformed_numeric_host_is_invalid_url(url, connects):
    result = Fetcher(FetchConfig(retries=0), resolver=RecordingResolver({})).fetch(url)

    assert result.reason == "invalid_url", (url, result.reason, result.detail)
    assert connects == []


@pytest.mark.parametrize(
    "url", ["http://[::1/a.jpg", "http://[zz]/a.jpg", "http://a b/a.jpg", "http://a\x00b/a.jpg", "http://a%2fb/a.jpg", "http://a<b>/a.jpg"]
)
def test_malformed_host_is_invalid_url(url, connects):
    resolver = RecordingResolver({})

    result = Fetcher(FetchConfig(retries=0), resolver=resolver).fetch(url)

    assert result.reason == "invalid_url", (url, result.reason, result.detail)
    assert resolver.calls == []
    assert connects == []


@pytest.mark.parametrize("location", ["http://[::1/a.jpg", "http://[zz]/a.jpg", "//[::1/a.jpg", "http://a b/a.jpg"])
def test_redirect_to_malformed_url_is_invalid_url(location, connects):
    resolver = RecordingResolver({})
    with HostileServer({"a.jpg": make_jpeg()}) as server:
        fetcher = Fetcher(FetchConfig(retries=0, allow_networks=("127.0.0.0/8",)), resolver=resolver)

        result = fetcher.fetch(server.url("/redirect-to?u=" + urllib.parse.quote(location, safe="")))

    assert result.reason == "invalid_url", (location, result.reason, result.detail)
    assert resolver.calls == []


RESOLVER_TABLE = {
    "localhost": ["127.0.0.1"],
    "metadata.google.internal": ["169.254.169.254"],
    "intranet.test": ["10.0.0.7"],
    "router.test": ["192.168.0.1"],
    "v6-loopback.test": ["::1"],
    "v6-mapped.test": ["::ffff:10.0.0.1"],
    "v6-ula.test": ["fd12:3456::1"],
    "cgnat.test": ["100.64.1.1"],
    # One public and one private answer: a rebinding setup; the whole host is refused.
    "mixed.test": ["93.184.216.34", "10.0.0.1"],
    "mixed-order.test": ["10.0.0.1", "93.184.216.34"],
}


@pytest.mark.parametrize("host", sorted(RESOLVER_TABLE))
def test_hostname_resolving_to_blocked_refused(host, connects):
    resolver = RecordingResolver(RESOLVER_TABLE)
    fetcher = Fetcher(FetchConfig(retries=0), resolver=resolver)

    result = fetcher.fetch(f"http://{host}/img.jpg")

    assert result.reason == "blocked_address", (host, result.detail)
    assert resolver.calls == [host]
    assert connects == []


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://127.0.0.1:70/_x", "data:image/png;base64,AAAA",
     "javascript:alert(1)", "dict://127.0.0.1:11211/", "//example.com/a.jpg", "a.jpg"],
)
def test_non_http_schemes_refused(url, connects):
    result = Fetcher(FetchConfig(retries=0), resolver=RecordingResolver({})).fetch(url)

    assert result.reason == "unsupported_scheme", (url, result.reason)
    assert connects == []


def test_guard_on_by_default_for_loopback_server(connects):
    with HostileServer({"a.jpg": make_jpeg()}) as server:
        result = Fetcher(FetchConfig(retries=0)).fetch(server.url("/img/a.jpg"))

        assert result.reason == "blocked_address"
        assert server.requests == {}
    assert connects == []


def test_allowlist_admits_only_its_networks(connects):
    guard = AddressGuard(("127.0.0.0/8",))

    guard.check("127.0.0.1")
    guard.check("127.8.9.10")
    for address in ("10.0.0.1", "169.254.169.254", "::1", "::ffff:192.168.0.1"):
        with pytest.raises(BlockedAddress):
            guard.check(address)
    AddressGuard().check("93.184.216.34")  # a public address passes the guard (no connection is made here)
    assert connects == []


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://10.0.0.1/",
        "http://[::1]:{port}/img/a.jpg",
        "http://[::ffff:169.254.169.254]/",
        "http://2852039166/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://intranet.test/a.jpg",
        "file:///etc/passwd",
    ],
)
def test_redirect_into_blocked_address_refused(target, connects):
    resolver = RecordingResolver(RESOLVER_TABLE)
    with HostileServer({"a.jpg": make_jpeg()}) as server:
        location = target.format(port=server.port)
        fetcher = Fetcher(FetchConfig(retries=0, allow_networks=("127.0.0.0/8",)), resolver=resolver)

        result = fetcher.fetch(server.url(f"/redirect-to?u={location}"))

        assert server.requests["/redirect-to"] == 1
        assert server.requests["/img/a.jpg"] == 0
    assert result.reason in ("blocked_address", "unsupported_scheme"), (target, result.reason, result.detail)
    addresses = {address[0] for kind, address in connects if kind.startswith("connect")}
    assert addresses == {"127.0.0.1"}
    assert not [c for c in connects if c[0] == "getaddrinfo"]


def test_connection_pinned_to_checked_address(connects):
    resolver = RecordingResolver({"images.test": ["127.0.0.1"]})
    with HostileServer({"a.jpg": make_jpeg()}) as server:
        fetcher = Fetcher(FetchConfig(retries=0, allow_networks=("127.0.0.0/8",)), resolver=resolver)

        result = fetcher.fetch(f"http://images.test:{server.port}/img/a.jpg")

    assert result.ok, result.detail
    assert resolver.calls == ["images.test"]
    assert connects == [("connect", ("127.0.0.1", server.port))]


def test_dns_failure_is_dns_reason(connects):
    result = Fetcher(FetchConfig(retries=0), resolver=RecordingResolver({})).fetch("http://no-such-host.test/a.jpg")

    assert result.reason == "dns"
    assert connects == []

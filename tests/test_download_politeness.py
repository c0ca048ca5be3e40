"""Per-host politeness, retries, opt-out and robots.txt of the fetcher, against loopback servers."""

from __future__ import annotations

import concurrent.futures
import random
import socket
import threading
import time

import pytest

from bm6b.filters.download import Fetcher, FetchConfig, parse_retry_after
from bm6b.filters.politeness import CircuitBreaker, HostBusy, HostLimiter, TokenBucket
from bm6b.filters.robots import RobotsRules, user_agent_token, x_robots_opt_out
from tests.download_servers import HostileServer, make_jpeg

LOCAL = dict(allow_networks=("127.0.0.0/8",), backoff_base=0.01, deadline=10.0)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def server():
    with HostileServer({f"{i}.jpg": make_jpeg(color=(i, 0, 0)) for i in range(12)}) as hostile:
        yield hostile


def test_token_bucket_spaces_requests():
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=1, clock=clock)

    waits = [bucket.reserve() for _ in range(4)]

    assert waits == [0.0, 0.5, 1.0, 1.5]


def test_token_bucket_refills_over_time():
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=3, clock=clock)

    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    clock.now += 2.0
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 1.0]


def test_host_limiter_rate_sleeps_on_fake_clock():
    clock = FakeClock()
    limiter = HostLimiter(host_rate=4.0, host_burst=1, clock=clock, sleep=clock.sleep)

    started = clock.now
    for _ in range(5):
        with limiter.slot("a.example", wait=60):
            pass
    with limiter.slot("b.example", wait=60) as waited:
        pass

    assert clock.now - started == pytest.approx(1.0)  # 5 requests at 4/s: 4 waits of 0.25 s
    assert waited == 0.0  # another host has its own bucket


def test_host_limiter_rejects_long_rate_wait():
    clock = FakeClock()
    limiter = HostLimiter(host_rate=0.1, host_burst=1, clock=clock, sleep=clock.sleep)
    with limiter.slot("a.example", wait=5):
        pass

    with pytest.raises(HostBusy, match="rate limit"):
        with limiter.slot("a.example", wait=5):
            pass


def test_host_concurrency_cap_holds(server):
    for i in range(12):
        server.delay_paths[f"/img/{i}.jpg"] = 0.15
    fetcher = Fetcher(FetchConfig(host_concurrency=2, **LOCAL))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetcher.fetch, [server.url(f"/img/{i}.jpg") for i in range(12)]))

    assert all(r.ok for r in results)
    assert server.max_active == 2


def test_global_connection_cap_holds(server):
    for i in range(12):
        server.delay_paths[f"/img/{i}.jpg"] = 0.15
    fetcher = Fetcher(FetchConfig(host_concurrency=0, max_connections=3, **LOCAL))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetcher.fetch, [server.url(f"/img/{i}.jpg") for i in range(12)]))

    assert all(r.ok for r in results)
    assert server.max_active == 3


def test_circuit_breaker_stops_requests(server):
    fetcher = Fetcher(FetchConfig(retries=0, breaker_failures=3, breaker_cooldown=600, **LOCAL))

    failures = [fetcher.fetch(server.url("/500")).reason for _ in range(3)]
    blocked = fetcher.fetch(server.url("/img/1.jpg"))

    assert failures == ["http_5xx"] * 3
    assert blocked.reason == "host_failing"
    assert server.requests["/500"] == 3
    assert server.requests["/img/1.jpg"] == 0


class FailingResolver:
    """A resolver whose every lookup fails after ``delay`` seconds, like a dead name server."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


def test_circuit_breaker_counts_dns_failures():
    resolver = FailingResolver()
    fetcher = Fetcher(FetchConfig(retries=0, breaker_failures=3, breaker_cooldown=600), resolver=resolver)

    reasons = [fetcher.fetch(f"http://dead.test/{i}.jpg").reason for i in range(10)]

    assert reasons == ["dns"] * 3 + ["host_failing"] * 7
    assert resolver.calls == 3


def test_circuit_breaker_stops_queued_lookups():
    # Twelve threads wait on one host's lookup lock. Once three lookups have failed, the rest
    # must not call the resolver again.
    resolver = FailingResolver(delay=0.05)
    fetcher = Fetcher(FetchConfig(retries=0, breaker_failures=3, breaker_cooldown=600), resolver=resolver)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        reasons = list(pool.map(lambda i: fetcher.fetch(f"http://dead.test/{i}.jpg").reason, range(12)))

    assert resolver.calls == 3
    assert reasons.count("dns") == 3
    assert reasons.count("host_failing") == 9


def test_circuit_breaker_resets_on_success():
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, cooldown=10, clock=clock)

    breaker.record_failure("h")
    breaker.record_success("h")
    breaker.record_failure("h")
    assert breaker.open_for("h") == 0.0
    breaker.record_failure("h")
    assert breaker.open_for("h") == 10.0
    clock.now += 10.5
    assert breaker.open_for("h") == 0.0


def test_backoff_waits_grow_with_jitter(server):
    waits: list[float] = []
    fetcher = Fetcher(FetchConfig(retries=3, allow_networks=("127.0.0.0/8",), backoff_base=0.5, backoff_max=8.0,
                                  breaker_failures=0), sleep=waits.append, rng=random.Random(7))

    result = fetcher.fetch(server.url("/500"))

    assert result.reason == "http_5xx"
    assert result.attempts == 4
    assert len(waits) == 3
    for attempt, wait in enumerate(waits):
        assert 0 <= wait <= 0.5 * 2**attempt


def test_retry_after_honoured(server):
    waits: list[float] = []
    fetcher = Fetcher(FetchConfig(retries=2, **LOCAL), sleep=waits.append)

    result = fetcher.fetch(server.url("/429-then-ok"))

    assert result.ok
    assert waits == [1.0]


def test_retry_after_parsing():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_user_agent_sent(server):
    Fetcher(FetchConfig(user_agent="bm6b-test/1.0 (+https://example.org/bot)", **LOCAL)).fetch(server.url("/img/1.jpg"))

    assert server.user_agents == ["bm6b-test/1.0 (+https://example.org/bot)"]


@pytest.mark.parametrize(
    "values, expected",
    [
        (["noai"], "noai"),
        (["noindex, nofollow"], "noindex"),
        (["NoImageAI"], "noimageai"),
        (["none"], "none"),
        (["bm6b: noimageindex"], "noimageindex"),
        (["otherbot: noai", "nofollow"], None),
        (["*: noai"], "noai"),
        (["unavailable_after: 25 Jun 2030 15:00:00 PST"], None),
        (["max-image-preview: large, noai"], "noai"),
        ([], None),
    ],
)
def test_x_robots_tag_parsing(values, expected):
    assert x_robots_opt_out(values, "bm6b") == expected


def test_opt_out_respected_and_configurable(server):
    respected = Fetcher(FetchConfig(**LOCAL)).fetch(server.url("/noai/1.jpg"))
    ignored = Fetcher(FetchConfig(respect_opt_out=False, **LOCAL)).fetch(server.url("/noai/1.jpg"))

    assert respected.reason == "opted_out"
    assert respected.body is None
    assert ignored.ok


def test_user_agent_token():
    assert user_agent_token("bm6b/0.1 (+https://github.com/bm6b/bm6b)") == "bm6b"
    assert user_agent_token("MyCrawler") == "MyCrawler"


def test_robots_txt_disallow_cached(server):
    server.robots_txt = b"User-agent: *\nDisallow: /private\n\nUser-agent: bm6b\nDisallow: /img/1.jpg\n"
    fetcher = Fetcher(FetchConfig(check_robots_txt=True, **LOCAL))

    results = {path: fetcher.fetch(server.url(path)).reason for path in ("/img/1.jpg", "/img/2.jpg", "/img/3.jpg")}

    assert results == {"/img/1.jpg": "opted_out", "/img/2.jpg": None, "/img/3.jpg": None}
    assert server.requests["/robots.txt"] == 1
    assert server.requests["/img/1.jpg"] == 0


def test_robots_txt_missing_allows(server):
    fetcher = Fetcher(FetchConfig(check_robots_txt=True, **LOCAL))

    assert fetcher.fetch(server.url("/img/1.jpg")).ok
    assert server.requests["/robots.txt"] == 1


def test_robots_txt_server_error_is_retryable(server):
    server.robots_txt = b"busy"
    server.robots_status = 503
    fetcher = Fetcher(FetchConfig(check_robots_txt=True, retries=0, **LOCAL))

    result = fetcher.fetch(server.url("/img/1.jpg"))

    assert result.reason == "http_5xx"
    assert "robots.txt" in result.detail
    assert server.requests["/img/1.jpg"] == 0


# (robots.txt, path, allowed for the "bm6b" token), each worked out by hand from RFC 9309. The
# longest matching rule wins and allow wins a tie. "*" matches any characters and a final "$"
# anchors the end. Only groups that name the product token exactly (in any case) apply.
ROBOTS_CASES = [
    ("User-agent: *\nDisallow: /*a*b$\n", "/xaxb", False),
    ("User-agent: *\nDisallow: /*a*b$\n", "/xbxa", True),
    ("User-agent: *\nDisallow: /*ab$\n", "/ab", False),
    ("User-agent: *\nDisallow: /a$\n", "/a", False),
    ("User-agent: *\nDisallow: /a$\n", "/ab", True),
    ("User-agent: *\nDisallow: /a*\n", "/a", False),
    ("User-agent: *\nDisallow: /*.jpg$\n", "/images/a.jpg", False),
    ("User-agent: *\nDisallow: /*.jpg$\n", "/images/a.jpg?size=big", True),
    ("User-agent: *\nDisallow: /*.jpg$\n", "/images/a.png", True),
    ("User-agent: *\nDisallow: /*/thumbs/\n", "/images/thumbs/a.jpg", False),
    ("User-agent: *\nAllow: /\nDisallow: /images/\n", "/images/a.jpg", False),
    ("User-agent: *\nDisallow: /images/\nAllow: /images/public/\n", "/images/public/a.jpg", True),
    ("User-agent: *\nDisallow: /images/\nAllow: /images/public/\n", "/images/private/a.jpg", False),
    ("User-agent: *\nAllow: /a\nDisallow: /a\n", "/a.jpg", True),
    ("User-agent: b\nDisallow: /\n", "/a.jpg", True),
    ("User-agent: bm6bot\nDisallow: /\n", "/a.jpg", True),
    ("User-agent: *\nDisallow: /\n\nUser-agent: BM6B\nAllow: /\n", "/a.jpg", True),
    ("User-agent: *\nDisallow: /\n\nUser-agent: bm6b\nDisallow: /private/\n", "/a.jpg", True),
    ("User-agent: other\nUser-agent: bm6b\nDisallow: /private/\n", "/private/a.jpg", False),
    ("User-agent: bm6b\nDisallow: /a/\n\nUser-agent: bm6b\nDisallow: /b/\n", "/b/1.jpg", False),
    ("User-agent: *\nDisallow:\n", "/a.jpg", True),
    ("user-AGENT: *   # every crawler\nDISALLOW: /x  # not this one\n", "/x/a.jpg", False),
    ("Disallow: /\nUser-agent: *\nAllow: /\n", "/a.jpg", True),
    ("User-agent: *\nDisallow: /\n", "/robots.txt", True),
    ("User-agent: *\nDisallow: /%E5%9B%BE/\n", "/图/a.jpg", False),
    ("User-agent: *\nDisallow: /图/\n", "/%e5%9b%be/a.jpg", False),
]


@pytest.mark.parametrize("robots_txt, path, allowed", ROBOTS_CASES)
def test_robots_rules_follow_rfc_9309(robots_txt, path, allowed):
    rules = RobotsRules(robots_txt)

    assert rules.allows("bm6b", f"http://images.test{path}") == allowed


def test_robots_rules_hostile_pattern_bounded():
    # A matcher that backtracks takes exponential time on this pattern and a path without "b".
    rules = RobotsRules("User-agent: *\nDisallow: /" + "*a" * 40 + "*b$\n")
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("allowed", rules.allows("bm6b", "http://h/" + "a" * 300)), daemon=True)

    thread.start()
    thread.join(5.0)

    assert not thread.is_alive(), "robots.txt rule matching did not finish within 5 s"
    assert box["allowed"] is True


def test_robots_txt_over_500_kib_truncated(server):
    # The rules come first and padding follows past 500 KiB: a crawler parses the first 500 KiB
    # and obeys them, instead of failing every image of the host.
    server.robots_txt = b"User-agent: *\nDisallow: /img/1.jpg\n" + b"# padding\n" * 60_000
    fetcher = Fetcher(FetchConfig(check_robots_txt=True, retries=0, **LOCAL))

    first = fetcher.fetch(server.url("/img/1.jpg"))
    second = fetcher.fetch(server.url("/img/2.jpg"))

    assert len(server.robots_txt) > 500 * 1024
    assert first.reason == "opted_out"
    assert second.ok, second.detail
    assert server.requests["/robots.txt"] == 1


def test_keep_alive_reuses_connections(server):
    fetcher = Fetcher(FetchConfig(**LOCAL))

    results = [fetcher.fetch(server.url(f"/img/{i % 12}.jpg")) for i in range(20)]

    assert all(r.ok for r in results)
    assert server.connections == 1


class StuckResolver:
    """A resolver whose lookups block until ``release`` is set, like a name server that never responds."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        with self.lock:
            self.calls += 1
        self.release.wait(30)
        return ["127.0.0.1"]


# Upper bounds on waits: far below the 30 s that a stuck lookup used to cost, and loose enough
# for a loaded 2-core CI machine.
SCHEDULING_SLACK = 1.0


@pytest.fixture
def stuck_resolver():
    resolver = StuckResolver()
    yield resolver
    resolver.release.set()  # lets the abandoned lookup threads end


def test_stuck_lookup_ends_at_deadline(stuck_resolver):
    fetcher = Fetcher(FetchConfig(retries=2, deadline=0.5, breaker_failures=0), resolver=stuck_resolver)

    started = time.monotonic()
    result = fetcher.fetch("http://stuck-dns.test/a.jpg")
    elapsed = time.monotonic() - started

    assert result.reason == "dns"
    assert result.detail.startswith("stuck-dns.test: lookup timed out after 0.5s")
    assert 0.5 <= elapsed < 0.5 + SCHEDULING_SLACK
    assert stuck_resolver.calls == 1


def test_stuck_lookups_share_one_query(stuck_resolver):
    # Four URLs of one host: one lookup runs, and the three threads queued behind it stop
    # waiting at their own deadlines.
    fetcher = Fetcher(FetchConfig(retries=0, deadline=0.5, breaker_failures=0), resolver=stuck_resolver)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(fetcher.fetch, [f"http://stuck-dns.test/{i}.jpg" for i in range(4)]))
    elapsed = time.monotonic() - started

    assert [r.reason for r in results] == ["dns"] * 4
    assert elapsed < 0.5 + SCHEDULING_SLACK
    assert stuck_resolver.calls == 1


def test_stuck_lookups_open_circuit(stuck_resolver):
    fetcher = Fetcher(FetchConfig(retries=0, deadline=0.3, breaker_failures=2, breaker_cooldown=600), resolver=stuck_resolver)

    reasons = [fetcher.fetch(f"http://stuck-dns.test/{i}.jpg").reason for i in range(4)]

    assert reasons == ["dns", "dns", "host_failing", "host_failing"]
    assert stuck_resolver.calls == 1  # the second fetch waits for the first, still running lookup


def test_lookup_time_counts_in_deadline(server):
    # A lookup that takes 0.4 s of a 0.6 s deadline leaves 0.2 s for a response that needs 0.5 s.
    server.delay_paths["/img/1.jpg"] = 0.5

    def slow_resolver(host, port):
        time.sleep(0.4)
        return ["127.0.0.1"]

    config = FetchConfig(retries=0, deadline=0.6, breaker_failures=0, allow_networks=("127.0.0.0/8",))
    fetcher = Fetcher(config, resolver=slow_resolver)

    started = time.monotonic()
    result = fetcher.fetch(f"http://slow-dns.test:{server.port}/img/1.jpg")
    elapsed = time.monotonic() - started

    assert result.reason == "timeout"
    assert elapsed < 0.6 + SCHEDULING_SLACK


def test_host_limiter_pause_delays_slots():
    clock = FakeClock()
    limiter = HostLimiter(clock=clock, sleep=clock.sleep)

    limiter.pause("a.example", 3.0)
    limiter.pause("a.example", 1.0)  # a shorter pause must not cut the longer one
    started = clock.now
    with limiter.slot("a.example", wait=60) as waited:
        pass
    with limiter.slot("b.example", wait=60) as other_waited:
        pass

    assert waited == 3.0
    assert clock.now - started == 3.0
    assert other_waited == 0.0


def test_host_limiter_pause_past_wait_raises():
    clock = FakeClock()
    limiter = HostLimiter(clock=clock, sleep=clock.sleep)
    limiter.pause("a.example", 10.0)

    with pytest.raises(HostBusy, match="paused for 10.0s"):
        with limiter.slot("a.example", wait=5):
            pass
    assert clock.now == 100.0  # it raised without sleeping


def request_times(server, path: str) -> list[float]:
    return [at for at, logged in server.request_log if logged == path]


@pytest.mark.parametrize("path", ["/429-then-ok", "/503-retry-after"])
def test_retry_after_pauses_whole_host(server, path):
    # Both paths respond to their first request with Retry-After: 1. No other URL of the host may
    # reach it sooner, but another host name on the same address is not held back.
    config = FetchConfig(retries=0, host_concurrency=0, **LOCAL)
    fetcher = Fetcher(config, resolver=lambda host, port: ["127.0.0.1"])

    first = fetcher.fetch(server.url(path))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        other_host = pool.submit(fetcher.fetch, f"http://other.test:{server.port}/img/3.jpg")
        same_host = list(pool.map(fetcher.fetch, [server.url("/img/1.jpg"), server.url("/img/2.jpg")]))
        other_host = other_host.result()

    assert first.retry_after == 1.0
    assert all(result.ok for result in same_host)
    assert other_host.ok
    (limited_at,) = request_times(server, path)
    for image in ("/img/1.jpg", "/img/2.jpg"):
        (requested_at,) = request_times(server, image)
        assert requested_at - limited_at >= 1.0 - 0.05, image  # 0.05 s for the 429 to travel back
    (other_at,) = request_times(server, "/img/3.jpg")
    assert other_at - limited_at < 1.0 - 0.1  # well before the 1 s pause ends


def test_retry_after_pause_capped(server):
    # /429-long sends Retry-After: 3600. The host's pause ends after max_retry_after.
    config = FetchConfig(retries=0, max_retry_after=0.5, **LOCAL)
    fetcher = Fetcher(config)

    first = fetcher.fetch(server.url("/429-long"))
    second = fetcher.fetch(server.url("/img/1.jpg"))

    assert first.reason == "http_429"
    assert second.ok
    (limited_at,) = request_times(server, "/429-long")
    (requested_at,) = request_times(server, "/img/1.jpg")
    assert 0.5 - 0.05 <= requested_at - limited_at < 0.5 + SCHEDULING_SLACK  # not 3600 s


def test_busy_lookup_slots_end_at_deadline(stuck_resolver):
    # One lookup slot, held by a stuck lookup of another host: the second host's lookup cannot
    # start, and its fetch ends at its deadline like a lookup that timed out.
    fetcher = Fetcher(FetchConfig(retries=0, deadline=0.3, breaker_failures=0, dns_concurrency=1), resolver=stuck_resolver)
    fetcher.fetch("http://stuck-dns.test/a.jpg")

    started = time.monotonic()
    result = fetcher.fetch("http://other-dns.test/b.jpg")
    elapsed = time.monotonic() - started

    assert result.reason == "dns"
    assert result.detail == "other-dns.test: lookup timed out after 0.3s (all 1 lookup slots are busy)"
    assert elapsed < 0.3 + SCHEDULING_SLACK
    assert stuck_resolver.calls == 1

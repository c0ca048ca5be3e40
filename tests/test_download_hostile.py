"""A download job over a hostile loopback server plus good URLs: bounded in time, every sample classified.

Bound: with at least as many threads as URLs, every URL finishes within ``DEADLINE`` seconds of
its first request (the fetcher's total deadline covers redirects, retries and backoff), plus
decode time. The job below must finish within ``JOB_BOUND`` seconds. That check is a hang guard
with generous slack for a loaded CI machine, not a speed test.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import socket
import threading

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from bm6b.filters.download import Fetcher, FetchConfig
from bm6b.filters.download_record import RecordDownloader, iter_download
from bm6b.filters.image import ImageConfig
from bm6b.pipelines import stages
from tests.download_servers import SMUGGLED, HostileServer, make_jpeg, make_noise_jpeg

DEADLINE = 4.0
JOB_BOUND = DEADLINE + 20.0

CONFIG = FetchConfig(
    timeout=1.5,
    connect_timeout=1.0,
    deadline=DEADLINE,
    max_bytes=2 * 1024 * 1024,
    min_throughput=2000,
    throughput_grace=1.0,
    retries=1,
    backoff_base=0.05,
    max_retry_after=2.0,
    allow_networks=("127.0.0.0/8",),
    breaker_failures=0,  # every URL shares one host here; the breaker has its own test
    host_concurrency=0,
)

GOOD = {f"good{i}.jpg": make_jpeg(color=(20 * i, 100, 255 - 20 * i)) for i in range(6)}

# path -> expected reject reason (None: kept)
HOSTILE = {
    "/img/good0.jpg": None,
    "/img/good1.jpg": None,
    "/img/good2.jpg": None,
    "/text-plain/good3.jpg": None,  # a real JPEG labelled text/plain is still a JPEG
    "/no-type/good4.jpg": None,
    "/otherbot-noindex/good5.jpg": None,  # scoped to another crawler
    "/503-then-ok": None,
    "/429-then-ok": None,  # Retry-After: 1 honoured, then 200
    "/redirect-chain/3": None,
    "/deflate/good1.jpg": None,  # Content-Encoding: deflate as a zlib stream
    "/raw-deflate/good2.jpg": None,  # Content-Encoding: deflate without the zlib wrapper
    "/html-as-jpeg": "not_an_image",
    "/svg": "not_an_image",
    "/empty": "empty_body",
    "/404": "http_404",
    "/403": "http_error",
    "/500": "http_5xx",
    "/429-long": "http_429",  # Retry-After: 3600 is longer than max_retry_after
    "/redirect-loop": "too_many_redirects",
    "/big-length": "too_large",
    "/endless": "too_large",
    "/gzip-bomb": "too_large",
    "/bad-gzip": "http_error",  # Content-Encoding: gzip on data that is not gzip
    "/slow-drip": "too_slow",
    "/slow-headers": "timeout",
    "/stall": "timeout",
    "/lying-long": "reset",  # Content-Length larger than the body, then close
    "/lying-short": "decode_error",  # Content-Length cuts the JPEG in half
    "/conflicting-length": "http_error",  # two different Content-Length headers
    "/length-list": "http_error",  # "Content-Length: 10, N"
    "/length-negative": "http_error",  # "Content-Length: -1" on a kept-alive connection
    "/reset": "reset",
    "/close-early": "reset",
    "/not-http": "http_error",
    "/noai/good0.jpg": "opted_out",
    "/early-hints/good0.jpg": None,  # 103, 103 and 100 before the 200
    "/endless-early-hints": "http_error",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_record(url: str, index: int) -> dict:
    return {"key": f"{index:016x}", "url": url, "source": "test", "source_row": index}


def run_bounded(function, bound: float):
    """Run ``function`` in a thread; fail the test if it does not return within ``bound`` seconds."""
    box: dict = {}

    def target():
        box["value"] = function()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"job still running after {bound}s: a fetch is not bounded"
    return box["value"]


@pytest.fixture
def server():
    with HostileServer(GOOD, drip_interval=0.2) as hostile:
        yield hostile


def test_hostile_job_classifies_every_sample(server):
    closed = free_port()
    urls = {server.url(path): reason for path, reason in HOSTILE.items()}
    urls[f"http://127.0.0.1:{closed}/x.jpg"] = "connect"
    urls["http://no-such-host.test/x.jpg"] = "dns"
    urls["http://metadata.test/latest/meta-data/"] = "blocked_address"
    urls["http://10.0.0.1/x.jpg"] = "blocked_address"
    urls["ftp://127.0.0.1/x.jpg"] = "unsupported_scheme"
    table = {"metadata.test": ["169.254.169.254"]}

    def resolver(host, port):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    downloader = RecordDownloader(CONFIG, ImageConfig(image_size=32), resolver=resolver)
    records = [make_record(url, i) for i, url in enumerate(urls)]

    def job():
        with concurrent.futures.ThreadPoolExecutor(len(records)) as pool:
            return list(iter_download(downloader, records, pool, max_in_flight=len(records)))

    outcomes = run_bounded(job, JOB_BOUND)
    downloader.close()

    got = {record["url"]: reason for record, reason, _ in outcomes}
    details = {record["url"]: detail for record, _, detail in outcomes}
    assert len(outcomes) == len(urls)
    for url, expected in urls.items():
        assert got[url] == expected, (url, got[url], details[url])


def test_hostile_job_retries_only_retryable(server):
    downloader = RecordDownloader(CONFIG, ImageConfig(image_size=32))
    paths = ["/404", "/403", "/429-long", "/500", "/503-then-ok", "/429-then-ok", "/html-as-jpeg", "/reset"]
    records = [make_record(server.url(path), i) for i, path in enumerate(paths)]

    def job():
        with concurrent.futures.ThreadPoolExecutor(len(records)) as pool:
            return list(iter_download(downloader, records, pool, max_in_flight=len(records)))

    run_bounded(job, JOB_BOUND)
    downloader.close()

    assert server.requests["/404"] == 1
    assert server.requests["/403"] == 1
    assert server.requests["/429-long"] == 1
    assert server.requests["/html-as-jpeg"] == 1
    assert server.requests["/500"] == 2  # retries=1
    # A reset on a reused keep-alive connection also earns a try on a fresh one (it looks like a stale
    # connection), so each of the two attempts may reach the server twice.
    assert 2 <= server.requests["/reset"] <= 4
    assert server.requests["/503-then-ok"] == 2
    assert server.requests["/429-then-ok"] == 2


def test_download_stage_in_beam(server):
    chosen = ("/img/good0.jpg", "/img/good1.jpg", "/404", "/stall", "/html-as-jpeg", "/endless", "/503-then-ok")
    records = [make_record(server.url(path), i) for i, path in enumerate(chosen)]
    expected_kept = [(server.url(p), 32, b"\xff\xd8\xff") for p in chosen if HOSTILE[p] is None]
    expected_rejected = [(server.url(p), HOSTILE[p], "download") for p in chosen if HOSTILE[p] is not None]

    def job():
        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
            out = pipeline | beam.Create(records) | stages.Download(CONFIG, ImageConfig(image_size=32, resize_mode="center_crop"), threads=8)
            kept = out.records | "Kept" >> beam.Map(lambda r: (r["url"], r["width"], r["image"][:3]))
            rejected = out.rejects | "Rejected" >> beam.Map(lambda r: (r["url"], r["reason"], r["stage"]))
            assert_that(kept, equal_to(expected_kept), label="CheckKept")
            assert_that(rejected, equal_to(expected_rejected), label="CheckRejected")
        return True

    assert run_bounded(job, JOB_BOUND + 10)


def test_excess_body_not_reused():
    # The first image is larger than http.client's read buffer (8 KiB in Python 3.11), so the bytes after its
    # Content-Length stay in the socket instead of being dropped with the first response.
    images = {"big.jpg": make_noise_jpeg(1, 480, 360), "next.jpg": make_noise_jpeg(2)}
    with HostileServer(images) as hostile:
        fetcher = Fetcher(dataclasses.replace(CONFIG, host_concurrency=1))

        first = fetcher.fetch(hostile.url("/excess-body/big.jpg"))
        second = fetcher.fetch(hostile.url("/img/next.jpg"))
        third = fetcher.fetch(hostile.url("/img/next.jpg"))
        fetcher.close()

    assert len(images["big.jpg"]) > 8192
    assert first.body == images["big.jpg"]
    assert second.body != SMUGGLED
    assert second.body == images["next.jpg"], second.detail
    assert third.body == images["next.jpg"], third.detail


def test_early_hints_skipped(server):
    fetcher = Fetcher(dataclasses.replace(CONFIG, host_concurrency=1))

    hinted = fetcher.fetch(server.url("/early-hints/good0.jpg"))
    at_bound = fetcher.fetch(server.url("/early-hints/good1.jpg?hints=9"))  # 9 x 103 + 100 = 10 skipped
    past_bound = fetcher.fetch(server.url("/early-hints/good2.jpg?hints=10"))
    endless = fetcher.fetch(server.url("/endless-early-hints"))
    fetcher.close()

    assert hinted.reason is None, hinted.detail
    assert hinted.status == 200
    assert hinted.body == GOOD["good0.jpg"]
    assert at_bound.reason is None, at_bound.detail
    assert at_bound.body == GOOD["good1.jpg"]
    assert past_bound.reason == "http_error"
    assert past_bound.detail == "more than 10 informational (1xx) responses without a final response"
    assert endless.reason == "http_error"
    assert endless.attempts == 1
    assert server.requests["/endless-early-hints"] == 1


class ZoneFileError(Exception):
    """An exception type that no part of the fetcher expects from a resolver."""


def test_unexpected_resolver_error_rejected(caplog):
    def resolver(host, port):
        raise ZoneFileError(f"cannot parse the zone of {host}")

    downloader = RecordDownloader(CONFIG, ImageConfig(image_size=32), resolver=resolver)
    records = [make_record(f"http://broken-zone.test/{i}.jpg", i) for i in range(2)]

    with caplog.at_level("DEBUG", logger="bm6b.filters.download_record"):
        outcomes = [downloader.run(record) for record in records]
    downloader.close()

    assert [reason for _, reason, _ in outcomes] == ["unexpected_error", "unexpected_error"]
    assert outcomes[0][2] == "ZoneFileError: cannot parse the zone of broken-zone.test"
    assert [record["key"] for record, _, _ in outcomes] == ["0000000000000000", "0000000000000001"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # the second error of the same type goes to DEBUG
    assert warnings[0].exc_info[0] is ZoneFileError
    assert "ZoneFileError" in warnings[0].getMessage()
    assert downloader.unexpected_errors == {"ZoneFileError": 2}


def test_encode_type_error_rejected_in_beam():
    # Pillow raises TypeError for a list as JPEG quality, which process_image does not catch.
    image = ImageConfig(image_size=32, jpeg_quality=[90])
    records = []
    for i in range(2):
        record = make_record(f"http://images.test/{i}.jpg", i)
        record.update(image=make_jpeg(color=(i, 0, 0)), prefetched=True)
        records.append(record)

    def job():
        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
            out = pipeline | beam.Create(records) | stages.Download(CONFIG, image, threads=2)
            kept = out.records | "Kept" >> beam.Map(lambda r: r["url"])
            rejected = out.rejects | "Rejected" >> beam.Map(lambda r: (r["url"], r["reason"], r["detail"].split(":")[0]))
            assert_that(kept, equal_to([]), label="CheckKept")
            expected = [(f"http://images.test/{i}.jpg", "unexpected_error", "TypeError") for i in range(2)]
            assert_that(rejected, equal_to(expected), label="CheckRejected")
        return True

    assert run_bounded(job, JOB_BOUND)

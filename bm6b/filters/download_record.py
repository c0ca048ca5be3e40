"""The per-record work of the download stage: fetch the URL, decode, check, resize, encode, hash.

``RecordDownloader.run(record)`` fills the image fields of a sample record or returns a reject
reason; ``iter_download`` runs it over many records on a thread pool and yields each record as
soon as it finishes, so one slow URL occupies one thread, not a whole batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from typing import Any, Iterable, Iterator

from bm6b.filters.download import Fetcher, FetchConfig, Resolver
from bm6b.filters.image import ImageConfig, process_image
from bm6b.schemas.reasons import Reason

logger = logging.getLogger(__name__)

# A record whose ``image`` already contains the original image bytes (for example read from an
# img2dataset shard) carries this flag; the downloader decodes it without fetching.
PREFETCHED = "prefetched"

Outcome = tuple[dict[str, Any], str | None, str]  # (record, reject reason or None, detail)


class RecordDownloader:
    def __init__(self, fetch: FetchConfig, image: ImageConfig, resolver: Resolver | None = None):
        self.fetcher = Fetcher(fetch, resolver=resolver)
        self.image_config = image
        # Unexpected exceptions per type name; only the first of each type is logged at WARNING.
        self.unexpected_errors: collections.Counter = collections.Counter()
        self._errors_lock = threading.Lock()

    def close(self) -> None:
        self.fetcher.close()

    def run(self, record: dict[str, Any]) -> Outcome:
        """Fetch and decode one record; any exception becomes an ``unexpected_error`` reject.

        The fetcher and the image code return reject reasons for every failure they know of. An
        exception that escapes them is a bug or an input that no check covers, and must cost one
        record, not the whole Beam bundle.
        """
        try:
            return self._run(record)
        except Exception as err:  # noqa: BLE001 - the catch-all is the point, see the docstring
            name = type(err).__name__
            with self._errors_lock:
                self.unexpected_errors[name] += 1
                first = self.unexpected_errors[name] == 1
            # One traceback per exception type at WARNING is enough to find the bug. The repeats
            # are in the rejects table, the counter and the DEBUG log.
            level = logging.WARNING if first else logging.DEBUG
            logger.log(level, "unexpected %s while downloading %s (key %s): %s", name, record.get("url"), record.get("key"), err, exc_info=True)
            return record, Reason.UNEXPECTED_ERROR.value, f"{name}: {str(err)[:200]}"

    def _run(self, record: dict[str, Any]) -> Outcome:
        if record.get(PREFETCHED):
            body = record.pop("image")
            record.pop(PREFETCHED)
        else:
            fetched = self.fetcher.fetch(record["url"])
            if not fetched.ok:
                return record, fetched.reason, fetched.detail
            body = fetched.body

        image = process_image(body, self.image_config)
        record["sha256"] = image.sha256
        if not image.ok:
            return record, image.reason, image.detail
        record.update(
            image=image.jpeg,
            image_format=image.encode_format,
            width=image.width,
            height=image.height,
            orig_width=image.orig_width,
            orig_height=image.orig_height,
            phash=image.phash,
        )
        return record, None, ""


def iter_download(
    downloader: RecordDownloader,
    records: Iterable[dict[str, Any]],
    pool: concurrent.futures.ThreadPoolExecutor,
    max_in_flight: int,
) -> Iterator[Outcome]:
    """Yield the outcome of every record in completion order, with at most ``max_in_flight`` queued."""
    in_flight: set[concurrent.futures.Future] = set()
    for record in records:
        in_flight.add(pool.submit(downloader.run, record))
        if len(in_flight) >= max_in_flight:
            done, in_flight = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            yield from (future.result() for future in done)
    for future in concurrent.futures.as_completed(in_flight):
        yield future.result()


class StreamingDownloads:
    """Submit records one at a time and collect finished outcomes; the Beam DoFn drives this.

    ``submit`` returns the outcomes that finished so far (blocking only while ``max_in_flight``
    records are pending); ``drain`` waits for the rest.
    """

    def __init__(self, downloader: RecordDownloader, threads: int, max_in_flight: int | None = None):
        self.downloader = downloader
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="bm6b-download")
        self.max_in_flight = max_in_flight or threads * 4
        self.pending: set[concurrent.futures.Future] = set()
        self.counts: collections.Counter = collections.Counter()

    def submit(self, record: dict[str, Any]) -> list[Outcome]:
        self.pending.add(self.pool.submit(self.downloader.run, record))
        finished = [f for f in self.pending if f.done()]
        if len(self.pending) - len(finished) >= self.max_in_flight:
            done, _ = concurrent.futures.wait(self.pending, return_when=concurrent.futures.FIRST_COMPLETED)
            finished = list(set(finished) | done)
        self.pending.difference_update(finished)
        return [f.result() for f in finished]

    def drain(self) -> list[Outcome]:
        done, _ = concurrent.futures.wait(self.pending)
        self.pending.clear()
        return [f.result() for f in done]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.downloader.close()

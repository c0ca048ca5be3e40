"""Crawler opt-out signals: the ``X-Robots-Tag`` response header and per-host robots.txt.

robots.txt outcomes follow RFC 9309: a 4xx answer (404 included) means no rules, so everything
is allowed; a 5xx answer or an unreachable file is a temporary failure, and the samples of that
host are rejected with a retryable reason instead of being fetched.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import urllib.parse
import urllib.robotparser
from typing import Callable, Iterable

# Directives that withdraw consent to crawling the image for an index or for AI training.
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})

# X-Robots-Tag directives that take a value after a colon, so "name:" is not a user-agent scope.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_SCOPE = re.compile(r"^\s*([A-Za-z0-9_*-]+)\s*:\s*(.*)$")

ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 asks crawlers to parse at least 500 KiB


def user_agent_token(user_agent: str) -> str:
    """Return the product token of a User-Agent ("bm6b/0.1 (+url)" -> "bm6b") for rule matching."""
    token = user_agent.strip().split("/", 1)[0].split(" ", 1)[0]
    return token or "*"


def x_robots_opt_out(values: Iterable[str], token: str) -> str | None:
    """Return the first opt-out directive that applies to ``token``, or None.

    A header value is either a plain directive list ("noai, noimageai") that applies to every
    crawler, or one scoped to a crawler ("otherbot: noindex"), which applies only when the name
    equals ``token`` (case-insensitive) or is "*".
    """
    token = token.lower()
    for value in values:
        scope = None
        directives = value
        match = _SCOPE.match(value)
        if match and match.group(1).lower() not in _VALUED_DIRECTIVES:
            scope, directives = match.group(1).lower(), match.group(2)
        if scope is not None and scope not in (token, "*"):
            continue
        for directive in directives.split(","):
            name = directive.strip().lower()
            if name in OPT_OUT_DIRECTIVES:
                return name
    return None


@dataclasses.dataclass(frozen=True)
class RobotsDocument:
    """The fetched robots.txt of one origin: parsed rules, or the failure that stopped the fetch."""

    parser: urllib.robotparser.RobotFileParser | None
    failure_reason: str | None = None
    failure_detail: str = ""


@dataclasses.dataclass(frozen=True)
class RobotsAnswer:
    allowed: bool
    reason: str | None = None  # a reject reason when not allowed
    detail: str = ""


# fetch(robots_url) -> (status, body, failure_reason, failure_detail); status is None on failure.
RobotsFetch = Callable[[str], tuple[int | None, bytes | None, str | None, str]]


class RobotsCache:
    """Fetch robots.txt once per origin (scheme, host, port) and answer ``check(url)`` from it.

    Concurrent checks of one origin wait for a single fetch. Entries expire after ``ttl``
    seconds; a failed fetch is cached for ``failure_ttl`` seconds so a dead host is not asked
    again for every URL.
    """

    def __init__(
        self,
        fetch: RobotsFetch,
        user_agent: str,
        ttl: float = 3600.0,
        failure_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.fetch = fetch
        self.token = user_agent_token(user_agent)
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.clock = clock
        self.entries: dict[str, tuple[float, RobotsDocument]] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    def _origin(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc.lower(), "", "", ""))

    def _document(self, origin: str) -> RobotsDocument:
        with self.lock:
            origin_lock = self.locks.setdefault(origin, threading.Lock())
        with origin_lock:
            cached = self.entries.get(origin)
            if cached is not None and cached[0] > self.clock():
                return cached[1]
            document = self._load(origin + "/robots.txt")
            ttl = self.failure_ttl if document.failure_reason else self.ttl
            self.entries[origin] = (self.clock() + ttl, document)
            return document

    def _load(self, robots_url: str) -> RobotsDocument:
        status, body, failure_reason, failure_detail = self.fetch(robots_url)
        parser = urllib.robotparser.RobotFileParser(robots_url)
        if status is None:
            return RobotsDocument(None, failure_reason, f"robots.txt: {failure_detail}")
        if 500 <= status < 600:
            return RobotsDocument(None, failure_reason, f"robots.txt: HTTP {status}")
        if status != 200:
            parser.allow_all = True
            return RobotsDocument(parser)
        text = (body or b"")[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace")
        parser.parse(text.splitlines())
        return RobotsDocument(parser)

    def check(self, url: str) -> RobotsAnswer:
        document = self._document(self._origin(url))
        if document.parser is None:
            return RobotsAnswer(False, document.failure_reason, document.failure_detail)
        if document.parser.can_fetch(self.token, url):
            return RobotsAnswer(True)
        return RobotsAnswer(False, "opted_out", f"robots.txt disallows {self.token} for this path")

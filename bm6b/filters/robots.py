"""Crawler opt-out signals: the ``X-Robots-Tag`` response header and per-host robots.txt.

robots.txt outcomes follow RFC 9309: a 4xx answer (404 included) means no rules, so everything
is allowed; a 5xx answer or an unreachable file is a temporary failure, and the samples of that
host are rejected with a retryable reason instead of being fetched. The rules are matched by
``RobotsRules`` as RFC 9309 specifies, which ``urllib.robotparser`` does not: it ignores ``*`` and
``$``, lets the first matching rule win instead of the longest, and matches user agents as substrings.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import urllib.parse
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


# Characters left as they are when a path or rule is put in percent-encoded form: the URL
# delimiters, "%" of existing escapes, and the "*" and "$" of rule patterns.
_PATH_SAFE = "/?=&;:@!$'()*+,-._~%"
_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


def _encode_path(path: str) -> str:
    """Percent-encode non-ASCII and unsafe characters and upper-case existing escapes."""
    return _ESCAPE.sub(lambda m: m.group(0).upper(), urllib.parse.quote(path, safe=_PATH_SAFE))


@dataclasses.dataclass(frozen=True)
class RobotsRule:
    allow: bool
    length: int  # octets of the encoded pattern, which rank matching rules
    chunks: tuple[str, ...]  # the literal parts between "*" wildcards
    anchored: bool  # the pattern ended in "$"

    def matches(self, path: str) -> bool:
        """Match from the start of ``path`` without backtracking, in O(len(path) * len(pattern)).

        Taking the leftmost place for each literal part is enough for patterns whose only
        wildcard is "*". A regular expression with ".*" per wildcard can backtrack exponentially
        on a hostile pattern such as "/*a*a*a*a*b$".
        """
        first, *rest = self.chunks
        if not path.startswith(first):
            return False
        position = len(first)
        if not rest:
            return not self.anchored or position == len(path)
        *middle, last = rest
        for chunk in middle:
            found = path.find(chunk, position)
            if found < 0:
                return False
            position = found + len(chunk)
        if self.anchored:
            return len(path) - len(last) >= position and path.endswith(last)
        return path.find(last, position) >= 0


def _compile_rule(allow: bool, value: str) -> RobotsRule:
    encoded = _encode_path(value)
    anchored = encoded.endswith("$")
    body = encoded[:-1] if anchored else encoded
    return RobotsRule(allow, len(encoded), tuple(body.split("*")), anchored)


class RobotsRules:
    """The groups of one robots.txt, matched as RFC 9309 specifies.

    A crawler obeys every group whose user-agent line equals its product token (case-insensitive),
    or the ``*`` groups when none does, and no rules at all when neither exists. A rule pattern
    may use ``*`` for any characters and a final ``$`` for the end of the path and query. The
    longest matching pattern decides, ``allow`` wins a tie, and /robots.txt is always allowed.
    """

    def __init__(self, text: str):
        self.groups: list[tuple[set[str], list[RobotsRule]]] = []
        agents: set[str] | None = None
        reading_rules = False
        for raw_line in text.splitlines():
            name, colon, value = raw_line.split("#", 1)[0].partition(":")
            if not colon:
                continue
            name, value = name.strip().lower(), value.strip()
            if name == "user-agent":
                # User-agent lines in a row share one group, and one that follows a rule starts the next group.
                if agents is None or reading_rules:
                    agents, reading_rules = set(), False
                    self.groups.append((agents, []))
                agents.add(value.split("/", 1)[0].strip().lower())
            elif name in ("allow", "disallow") and agents is not None:
                # Rules before the first user-agent line belong to no group and are ignored.
                reading_rules = True
                if value:
                    self.groups[-1][1].append(_compile_rule(name == "allow", value))

    def rules_for(self, token: str) -> list[RobotsRule]:
        token = token.lower()
        for agent in (token, "*"):
            groups = [rules for agents, rules in self.groups if agent in agents]
            if groups:
                return [rule for rules in groups for rule in rules]
        return []

    def allows(self, token: str, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        path = parts.path or "/"
        if path == "/robots.txt":
            return True
        target = _encode_path(path + (f"?{parts.query}" if parts.query else ""))
        best: RobotsRule | None = None
        for rule in self.rules_for(token):
            if not rule.matches(target):
                continue
            if best is None or rule.length > best.length or (rule.length == best.length and rule.allow):
                best = rule
        return best is None or best.allow


@dataclasses.dataclass(frozen=True)
class RobotsDocument:
    """The fetched robots.txt of one origin: parsed rules, or the failure that stopped the fetch."""

    rules: RobotsRules | None
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
        if status is None:
            return RobotsDocument(None, failure_reason, f"robots.txt: {failure_detail}")
        if 500 <= status < 600:
            return RobotsDocument(None, failure_reason, f"robots.txt: HTTP {status}")
        if status != 200:
            return RobotsDocument(RobotsRules(""))
        body = body or b""
        if len(body) >= ROBOTS_MAX_BYTES:
            # The fetch stops at the limit, so the last line may be cut off and is dropped.
            body = body[:ROBOTS_MAX_BYTES]
            body = body[: body.rfind(b"\n") + 1]
        return RobotsDocument(RobotsRules(body.decode("utf-8", errors="replace")))

    def check(self, url: str) -> RobotsAnswer:
        document = self._document(self._origin(url))
        if document.rules is None:
            return RobotsAnswer(False, document.failure_reason, document.failure_detail)
        if document.rules.allows(self.token, url):
            return RobotsAnswer(True)
        return RobotsAnswer(False, "opted_out", f"robots.txt disallows {self.token} for this path")

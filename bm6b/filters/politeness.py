"""Per-host politeness for the fetcher: concurrency caps, token-bucket rates and a circuit breaker.

All state lives in one process. On a distributed runner every worker process applies the limits
on its own, so the load one host sees is at most the per-host limits times the number of workers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

Clock = Callable[[], float]


class HostBusy(Exception):
    """Raised when a host slot did not become free within the allowed wait."""


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` stored."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic):
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self.tokens = self.burst
        self.updated = clock()
        self.lock = threading.Lock()

    def reserve(self) -> float:
        """Take one token and return how many seconds the caller must wait before using it.

        The token is taken even when the wait is positive, so concurrent callers queue up in
        order instead of all waking at the same moment.
        """
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            self.tokens -= 1.0
            if self.tokens >= 0:
                return 0.0
            return -self.tokens / self.rate

    def cancel(self) -> None:
        """Return a reserved token that the caller will not use."""
        with self.lock:
            self.tokens = min(self.burst, self.tokens + 1.0)


class CircuitBreaker:
    """Open a host's circuit after ``threshold`` consecutive failures, for ``cooldown`` seconds.

    While open, ``open_for(host)`` returns the seconds left and callers fail fast without
    connecting. After the cooldown the next request goes through; a success closes the circuit
    and another failure opens it again at once.
    """

    def __init__(self, threshold: int, cooldown: float, clock: Clock = time.monotonic):
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures: dict[str, int] = {}
        self.opened_at: dict[str, float] = {}
        self.lock = threading.Lock()

    def open_for(self, host: str) -> float:
        if self.threshold <= 0:
            return 0.0
        with self.lock:
            opened = self.opened_at.get(host)
            if opened is None:
                return 0.0
            return max(0.0, opened + self.cooldown - self.clock())

    def failures_of(self, host: str) -> int:
        with self.lock:
            return self.failures.get(host, 0)

    def record_success(self, host: str) -> None:
        with self.lock:
            self.failures.pop(host, None)
            self.opened_at.pop(host, None)

    def record_failure(self, host: str) -> None:
        if self.threshold <= 0:
            return
        with self.lock:
            count = self.failures.get(host, 0) + 1
            self.failures[host] = count
            if count >= self.threshold:
                self.opened_at[host] = self.clock()


class HostLimiter:
    """Grant request slots under a per-host concurrency cap, a per-host rate and a global cap.

    ``host_concurrency`` and ``max_connections`` of 0 mean no cap; ``host_rate`` of 0 means no
    rate limit. ``pause(host, seconds)`` holds back every later slot of the host, as a
    ``Retry-After`` header requests. ``slot(host, wait)`` blocks for at most ``wait`` seconds,
    then raises HostBusy.
    """

    def __init__(
        self,
        host_concurrency: int = 0,
        host_rate: float = 0.0,
        host_burst: float = 1.0,
        max_connections: int = 0,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.host_concurrency = host_concurrency
        self.host_rate = host_rate
        self.host_burst = host_burst
        self.clock = clock
        self.sleep = sleep
        self.global_slots = threading.BoundedSemaphore(max_connections) if max_connections > 0 else None
        self.host_slots: dict[str, threading.BoundedSemaphore] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.paused_until: dict[str, float] = {}  # host -> clock time of its next allowed request
        self.lock = threading.Lock()

    def pause(self, host: str, seconds: float) -> None:
        """Grant no slot for ``host`` during the next ``seconds``. A shorter pause does not end a longer one."""
        with self.lock:
            until = self.clock() + seconds
            if until > self.paused_until.get(host, 0.0):
                self.paused_until[host] = until

    def paused_for(self, host: str) -> float:
        """Return the seconds left in the host's pause, or 0."""
        with self.lock:
            until = self.paused_until.get(host)
            if until is None:
                return 0.0
            left = until - self.clock()
            if left <= 0:
                del self.paused_until[host]
                return 0.0
            return left

    def _host_state(self, host: str) -> tuple[threading.BoundedSemaphore | None, TokenBucket | None]:
        with self.lock:
            slots = self.host_slots.get(host)
            if slots is None and self.host_concurrency > 0:
                slots = self.host_slots[host] = threading.BoundedSemaphore(self.host_concurrency)
            bucket = self.buckets.get(host)
            if bucket is None and self.host_rate > 0:
                bucket = self.buckets[host] = TokenBucket(self.host_rate, self.host_burst, self.clock)
            return slots, bucket

    @contextlib.contextmanager
    def slot(self, host: str, wait: float) -> Iterator[float]:
        """Hold one request slot for ``host``; yields the seconds spent waiting for it."""
        started = self.clock()
        slots, bucket = self._host_state(host)
        acquired: list[threading.BoundedSemaphore] = []
        try:
            if slots is not None:
                if not slots.acquire(timeout=max(0.0, wait)):
                    raise HostBusy(f"no free connection slot for {host} within {wait:.1f}s")
                acquired.append(slots)

            if bucket is not None:
                delay = bucket.reserve()
                remaining = wait - (self.clock() - started)
                if delay > remaining:
                    bucket.cancel()
                    raise HostBusy(f"rate limit for {host} needs a {delay:.1f}s wait, more than the {remaining:.1f}s left")
                if delay > 0:
                    self.sleep(delay)

            # Checked after the other waits, so that a pause set during them still holds. The
            # loop picks up a pause that another request extends while this one sleeps.
            paused = self.paused_for(host)
            while paused > 0:
                remaining = wait - (self.clock() - started)
                if paused > remaining:
                    raise HostBusy(f"{host} is paused for {paused:.1f}s more after a Retry-After, more than the {remaining:.1f}s left")
                self.sleep(paused)
                paused = self.paused_for(host)

            if self.global_slots is not None:
                remaining = wait - (self.clock() - started)
                if not self.global_slots.acquire(timeout=max(0.0, remaining)):
                    raise HostBusy(f"no free global connection slot within {wait:.1f}s")
                acquired.append(self.global_slots)

            yield self.clock() - started
        finally:
            for semaphore in reversed(acquired):
                semaphore.release()

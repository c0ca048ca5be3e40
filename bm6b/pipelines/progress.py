"""Progress of a running curate job from the ``bm6b`` Metrics counters.

The stages count ``{stage}.in``, ``{stage}.out`` and ``{stage}.reject.{reason}`` in the ``bm6b``
Metrics namespace on every runner. This module reads those counters while the job runs. It logs a
line when a stage starts, one progress line per interval (rows in and out per stage, rejects, rows
per second), and a summary per stage when the job ends.

Where the counters come from:

* On runners whose ``run()`` returns at once (Dataflow, Flink, Spark, Prism), a thread polls
  ``PipelineResult.metrics()`` until the job finishes.
* Beam's in-process ``FnApiRunner`` returns from ``run()`` only when the job is done, so
  ``ProgressFnApiRunner`` adds each finished bundle's counters as it completes and asks the
  in-process SDK worker for the counters of the bundles still running.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Iterable

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.portability import portable_metrics
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.runner import PipelineState

logger = logging.getLogger(__name__)

NAMESPACE = "bm6b"
DEFAULT_INTERVAL_S = 10.0
LOCAL_RUNNERS = ("FnApiRunner", "BundleBasedDirectRunner")

Counters = dict[str, int]


def bm6b_counters(counter_results: Iterable[tuple[Any, int]]) -> Counters:
    """Sum (MetricKey, value) pairs of the ``bm6b`` namespace into {counter name: value}."""
    totals: Counters = collections.Counter()
    for key, value in counter_results:
        if key.metric.namespace == NAMESPACE:
            totals[key.metric.name] += int(value)
    return dict(totals)


def counters_from_monitoring_infos(infos) -> Counters:
    counters = portable_metrics.from_monitoring_infos(infos, user_metrics_only=True)[0]
    return bm6b_counters(counters.items())


def counters_from_result(result) -> Counters:
    """Read the ``bm6b`` counters of a PipelineResult (attempted values, which runners report live)."""
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    return bm6b_counters((c.key, c.attempted if c.attempted is not None else c.committed or 0)
                         for c in query["counters"])


@dataclasses.dataclass
class StageCounts:
    rows_in: int = 0
    rows_out: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def by_stage(counters: Counters) -> dict[str, StageCounts]:
    """Group ``{stage}.in|out|reject.{reason}`` counters by stage, in first-seen order."""
    stages: dict[str, StageCounts] = {}
    for name, value in counters.items():
        stage, _, what = name.partition(".")
        counts = stages.setdefault(stage, StageCounts())
        if what == "in":
            counts.rows_in += value
        elif what == "out":
            counts.rows_out += value
        elif what.startswith("reject."):
            reason = what[len("reject."):]
            counts.rejected[reason] = counts.rejected.get(reason, 0) + value
    return stages


class ProgressLog:
    """Turns successive counter snapshots into log lines: stage starts, progress and a final summary."""

    def __init__(self, log: logging.Logger = logger, clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.clock = clock
        self.started_at = clock()
        self.first_seen: dict[str, float] = {}
        self.last_change: dict[str, float] = {}
        self.previous: dict[str, StageCounts] = {}
        self.previous_time = self.started_at
        self._lock = threading.RLock()

    def update(self, counters: Counters, report: bool = True) -> dict[str, StageCounts]:
        with self._lock:
            return self._update(counters, report)

    def _update(self, counters: Counters, report: bool) -> dict[str, StageCounts]:
        now = self.clock()
        stages = by_stage(counters)
        for stage, counts in stages.items():
            before = self.previous.get(stage)
            if stage not in self.first_seen and counts.rows_in > 0:
                # The stage started after the previous snapshot, which saw no rows for it.
                self.first_seen[stage] = self.previous_time
                self.last_change[stage] = now
                self.log.info("stage %s started", stage)
            elif before is not None and before.rows_in != counts.rows_in:
                self.last_change[stage] = now

        if report and stages:
            elapsed = max(now - self.previous_time, 1e-9)
            parts = []
            for stage, counts in stages.items():
                before = self.previous.get(stage, StageCounts())
                rate = (counts.rows_in - before.rows_in) / elapsed
                parts.append(f"{stage} {counts.rows_in} in / {counts.rows_out} out / "
                             f"{counts.rejected_total} rejected ({rate:.1f}/s)")
            self.log.info("progress after %.0f s: %s", now - self.started_at, "; ".join(parts))
        self.previous = stages
        self.previous_time = now
        return stages

    def bundle_done(self, started: float, finished: float, counters: Counters) -> None:
        """Record a finished bundle of the in-process runner and log what each stage in it did."""
        with self._lock:
            for stage, counts in by_stage(counters).items():
                if counts.rows_in == 0:
                    continue
                if stage not in self.first_seen:
                    self.first_seen[stage] = started
                    self.log.info("stage %s started", stage)
                else:
                    self.first_seen[stage] = min(self.first_seen[stage], started)
                self.last_change[stage] = max(self.last_change.get(stage, finished), finished)
                duration = finished - started
                rate = f"{counts.rows_in / duration:.1f} rows/s" if duration > 0 else "rate unknown"
                self.log.info("stage %s: bundle done in %.1f s, %d in, %d out, %d rejected, %s", stage, duration,
                              counts.rows_in, counts.rows_out, counts.rejected_total, rate)

    def finish(self, counters: Counters) -> dict[str, StageCounts]:
        """Log each stage's totals and its rate over the time it was seen running."""
        stages = self.update(counters, report=False)
        now = self.clock()
        for stage, counts in stages.items():
            # From the last snapshot without the stage to the last one where its count grew: an
            # upper bound of its running time, so the rate is a lower bound.
            first = self.first_seen.get(stage, self.started_at)
            last = self.last_change.get(stage, now)
            active = last - first if last > first else now - self.started_at
            rate = f"{counts.rows_in / active:.1f} rows/s" if active > 0 else "rate unknown"
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.rejected.items())) or "none"
            self.log.info("stage %s finished: %d in, %d out, %d rejected (%s), %s", stage, counts.rows_in,
                          counts.rows_out, counts.rejected_total, reasons, rate)
        return stages


class ProgressFnApiRunner(FnApiRunner):
    """Beam's in-process runner, plus live ``bm6b`` counters for a progress thread to read.

    ``snapshot()`` returns finished bundles' counters plus those of the bundles running right
    now. The running ones are read by sending a ProcessBundleProgressRequest to the in-process
    SDK worker, the request Beam's own progress thread sends. With
    ``--direct_running_mode=multi_processing`` the workers are other processes, so there only
    finished bundles count.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress: ProgressLog | None = None  # receives each finished bundle's counters when set
        self._lock = threading.Lock()
        self._finished: Counters = collections.Counter()
        self._handlers: list[Any] = []
        self._request_ids = itertools.count(1)

    def _execute_bundle(self, runner_execution_context, bundle_context_manager, bundle_input):
        with self._lock:
            self._handlers = list(bundle_context_manager.worker_handlers)
        started = time.monotonic()
        result = super()._execute_bundle(runner_execution_context, bundle_context_manager, bundle_input)
        finished = counters_from_monitoring_infos(result.process_bundle.monitoring_infos)
        with self._lock:
            self._finished.update(finished)
            self._handlers = []
        if self.progress is not None:
            self.progress.bundle_done(started, time.monotonic(), finished)
        return result

    def _running_counters(self, handlers) -> Counters:
        totals: Counters = collections.Counter()
        for handler in handlers:
            cache = getattr(handler, "bundle_processor_cache", None)
            if cache is None:
                continue
            for instruction_id in list(cache.active_bundle_processors):
                request = beam_fn_api_pb2.InstructionRequest(
                    instruction_id=f"bm6b-progress-{next(self._request_ids)}",
                    process_bundle_progress=beam_fn_api_pb2.ProcessBundleProgressRequest(instruction_id=instruction_id),
                )
                response = handler.control_conn.push(request).get()
                if response.error:
                    continue  # the bundle finished between the listing and the request
                totals.update(counters_from_monitoring_infos(response.process_bundle_progress.monitoring_infos))
        return dict(totals)

    def snapshot(self) -> Counters:
        with self._lock:
            handlers = list(self._handlers)
            finished = dict(self._finished)
            # Holding the lock keeps _execute_bundle from adding a bundle to _finished while it is
            # read as running, so no bundle counts twice.
            running = self._running_counters(handlers)
        totals = collections.Counter(finished)
        totals.update(running)
        return dict(totals)


def runner_for(options: PipelineOptions) -> ProgressFnApiRunner | None:
    """Return a ProgressFnApiRunner when ``options`` select Beam's in-process runner, else None."""
    name = options.view_as(StandardOptions).runner
    if name not in LOCAL_RUNNERS:
        return None
    return ProgressFnApiRunner()


class _Poller(threading.Thread):
    def __init__(self, read: Callable[[], Counters], progress: ProgressLog, interval_s: float):
        super().__init__(name="bm6b-progress", daemon=True)
        self.read = read
        self.progress = progress
        self.interval_s = interval_s
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.interval_s):
            try:
                self.progress.update(self.read())
            except Exception as err:  # noqa: BLE001 (a failed read must not stop the job; log it and go on)
                logger.warning("progress: could not read the job's counters: %s", err)

    def stop(self):
        self.stopped.set()
        self.join()


def run_with_progress(pipeline, interval_s: float = DEFAULT_INTERVAL_S, log: logging.Logger = logger):
    """Run ``pipeline`` to completion while logging progress; return its PipelineResult.

    Raises RuntimeError when the job ends in a state other than DONE.
    """
    progress = ProgressLog(log)
    runner = pipeline.runner
    if isinstance(runner, ProgressFnApiRunner):
        runner.progress = progress
        poller = _Poller(runner.snapshot, progress, interval_s)
        poller.start()
        try:
            result = pipeline.run()
        finally:
            poller.stop()
    else:
        result = pipeline.run()
        poller = _Poller(lambda: counters_from_result(result), progress, interval_s)
        poller.start()
        try:
            result.wait_until_finish()
        finally:
            poller.stop()

    if result.state != PipelineState.DONE:
        raise RuntimeError(f"the pipeline ended in state {result.state}")
    progress.finish(counters_from_result(result))
    return result


"""Progress reporting from the bm6b Metrics counters, on Beam's real in-process runner."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from bm6b.pipelines import progress

# Shared with the DoFn below: the in-process runner runs it in this process and thread pool.
RELEASE = threading.Event()
SEEN_LIVE: list[int] = []


class CountThenWait(beam.DoFn):
    """Count each element as ``slow.in``, then hold the bundle open until the test releases it."""

    def process(self, element):
        Metrics.counter("bm6b", "slow.in").inc()
        if element == 4:
            RELEASE.wait(timeout=60)
        yield element


class Classify(beam.DoFn):
    def process(self, element):
        Metrics.counter("bm6b", "demo.in").inc()
        if element % 3 == 0:
            Metrics.counter("bm6b", "demo.reject.multiple_of_3").inc()
            return
        Metrics.counter("bm6b", "demo.out").inc()
        Metrics.counter("other", "demo.in").inc()  # another namespace: ignored
        yield element


def test_by_stage_groups_counters():
    stages = progress.by_stage({"download.in": 10, "download.out": 7, "download.reject.http_404": 2,
                                "download.reject.connect": 1, "lid.in": 7})
    assert list(stages) == ["download", "lid"]
    assert stages["download"].rows_in == 10
    assert stages["download"].rows_out == 7
    assert stages["download"].rejected == {"http_404": 2, "connect": 1}
    assert stages["download"].rejected_total == 3
    assert stages["lid"].rows_out == 0


def test_progress_log_lines(caplog):
    now = [100.0]
    log = progress.ProgressLog(logging.getLogger("test.progress"), clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="test.progress")

    now[0] = 110.0
    log.update({"download.in": 50, "download.out": 40, "download.reject.timeout": 10})
    now[0] = 120.0
    log.update({"download.in": 150, "download.out": 130, "download.reject.timeout": 20, "lid.in": 130})
    now[0] = 125.0
    log.finish({"download.in": 150, "download.out": 130, "download.reject.timeout": 20,
                "lid.in": 130, "lid.out": 130})

    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "stage download started"
    # 50 rows in the first 10 s, 100 more in the next 10 s.
    assert messages[1] == "progress after 10 s: download 50 in / 40 out / 10 rejected (5.0/s)"
    assert messages[2] == "stage lid started"
    assert messages[3] == ("progress after 20 s: download 150 in / 130 out / 20 rejected (10.0/s); "
                           "lid 130 in / 0 out / 0 rejected (13.0/s)")
    # download: absent at 100, last grew at 120 -> 150 rows over 20 s.
    assert messages[4] == "stage download finished: 150 in, 130 out, 20 rejected (timeout 20), 7.5 rows/s"
    # lid: absent at 110, last grew at 120 -> 130 rows over 10 s.
    assert messages[5] == "stage lid finished: 130 in, 130 out, 0 rejected (none), 13.0 rows/s"


def test_runner_for_picks_local_runner():
    assert isinstance(progress.runner_for(PipelineOptions(["--runner=FnApiRunner"])), progress.ProgressFnApiRunner)
    assert progress.runner_for(PipelineOptions(["--runner=DataflowRunner"])) is None
    assert progress.runner_for(PipelineOptions(["--runner=FlinkRunner"])) is None


def test_snapshot_sees_running_bundle():
    """While a bundle is still running, snapshot() already counts its elements."""
    RELEASE.clear()
    SEEN_LIVE.clear()
    runner = progress.ProgressFnApiRunner()

    def watch():
        for _ in range(600):
            count = runner.snapshot().get("slow.in", 0)
            if count >= 5:
                SEEN_LIVE.append(count)
                break
            threading.Event().wait(0.05)
        RELEASE.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    pipeline = beam.Pipeline(runner=runner, options=PipelineOptions([]))
    _ = pipeline | beam.Create(range(5)) | beam.ParDo(CountThenWait())
    result = pipeline.run()
    watcher.join()

    assert SEEN_LIVE == [5]
    assert progress.counters_from_result(result) == {"slow.in": 5}
    assert runner.snapshot() == {"slow.in": 5}


def test_run_with_progress_logs_stages(caplog):
    caplog.set_level(logging.INFO, logger="test.progress")
    options = PipelineOptions(["--runner=FnApiRunner"])
    pipeline = beam.Pipeline(runner=progress.runner_for(options), options=options)
    _ = pipeline | beam.Create(range(1, 10)) | beam.ParDo(Classify())

    result = progress.run_with_progress(pipeline, interval_s=60, log=logging.getLogger("test.progress"))

    # 1..9: 3, 6 and 9 are multiples of 3.
    assert progress.counters_from_result(result) == {"demo.in": 9, "demo.out": 6, "demo.reject.multiple_of_3": 3}
    messages = [r.getMessage() for r in caplog.records]
    assert "stage demo started" in messages
    finished = [m for m in messages if m.startswith("stage demo finished")]
    assert len(finished) == 1
    assert finished[0].startswith("stage demo finished: 9 in, 6 out, 3 rejected (multiple_of_3 3), ")


def test_run_with_progress_multiprocess(monkeypatch):
    """The multi-process mode of the local runner (workers in other processes) runs and counts."""
    # The worker processes unpickle Classify by module name, so they need this folder on their path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                   os.environ.get("PYTHONPATH")])))
    options = PipelineOptions(["--runner=FnApiRunner", "--direct_running_mode=multi_processing",
                               "--direct_num_workers=2"])
    pipeline = beam.Pipeline(runner=progress.runner_for(options), options=options)
    _ = pipeline | beam.Create(range(1, 10)) | beam.ParDo(Classify())
    result = progress.run_with_progress(pipeline, interval_s=60)
    assert progress.counters_from_result(result) == {"demo.in": 9, "demo.out": 6, "demo.reject.multiple_of_3": 3}


def test_snapshot_before_run_is_empty():
    assert progress.ProgressFnApiRunner().snapshot() == {}

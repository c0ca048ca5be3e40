"""Run statistics derived from the written output: per-stage in/out counts and reject reasons.

The counts are computed from the shards and the rejects table after the job finishes, so they
hold on every runner and double as a check: ``input_rows == kept + rejected``.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

# Stages in pipeline order; a stage's input is the previous stage's output.
STAGE_ORDER = (
    "ingest",
    "dedup_url",
    "download",
    "captions",
    "lid",
    "caption_frequency",
    "translate",
    "dedup_image",
    "decontam",
    "dedup_near_image",
    "dedup_caption",
    "clip",
    "write",
)


def _match(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _read_columns(paths: list[str], columns: list[str]) -> dict[str, list]:
    values: dict[str, list] = {c: [] for c in columns}
    for path in paths:
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle, columns=columns)
        for column in columns:
            values[column].extend(table.column(column).to_pylist())
    return values


def compute_stats(output: str, stages: list[str] | tuple[str, ...] = STAGE_ORDER) -> dict[str, Any]:
    shard_paths = _match(FileSystems.join(output, "[0-9]*.parquet"))
    kept = _read_columns(shard_paths, ["caption_zh", "caption_en"])
    rejects = _read_columns(_match(FileSystems.join(output, "rejects", "*.parquet")), ["stage", "reason"])

    by_stage: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for stage, reason in zip(rejects["stage"], rejects["reason"]):
        by_stage[stage][reason] += 1
    n_kept = len(kept["caption_zh"])
    n_rejected = len(rejects["stage"])

    stage_rows = []
    remaining = n_kept + n_rejected
    known = [s for s in stages] + sorted(set(by_stage) - set(stages))
    for stage in known:
        rejected = dict(sorted(by_stage.get(stage, {}).items()))
        out = remaining - sum(rejected.values())
        stage_rows.append({"stage": stage, "in": remaining, "out": out, "rejected": rejected})
        remaining = out

    has_zh = sum(1 for c in kept["caption_zh"] if c)
    has_en = sum(1 for c in kept["caption_en"] if c)
    both = sum(1 for zh, en in zip(kept["caption_zh"], kept["caption_en"]) if zh and en)
    reasons = collections.Counter(rejects["reason"])
    return {
        "input_rows": n_kept + n_rejected,
        "kept": n_kept,
        "rejected": n_rejected,
        "shards": len(shard_paths),
        "captions": {"zh": has_zh, "en": has_en, "both": both},
        "stages": stage_rows,
        "rejects_by_reason": dict(sorted(reasons.items())),
    }


def write_stats(output: str, stats: dict[str, Any]) -> None:
    path = FileSystems.join(output, "stats.json")
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(stats, indent=2, ensure_ascii=False).encode("utf-8"))


def format_funnel(stats: dict[str, Any]) -> str:
    """Return the per-stage funnel as a small text table for the terminal."""
    width = max([len("stage")] + [len(stage["stage"]) for stage in stats["stages"]]) + 2
    lines = [f"{'stage':<{width}}{'in':>9}{'out':>9}  rejected"]
    for stage in stats["stages"]:
        reasons = ", ".join(f"{k}={v}" for k, v in stage["rejected"].items()) or "-"
        lines.append(f"{stage['stage']:<{width}}{stage['in']:>9}{stage['out']:>9}  {reasons}")
    lines.append(
        f"kept {stats['kept']} of {stats['input_rows']} rows in {stats['shards']} shard(s); "
        f"captions zh={stats['captions']['zh']} en={stats['captions']['en']} both={stats['captions']['both']}"
    )
    return "\n".join(lines)

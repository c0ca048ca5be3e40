"""Loading a finished curate output folder, and the per-language numbers the report plots.

Everything here reads the written output: ``stats.json``, the shard Parquet files and
``rejects/*.parquet``. Columns that an older or newer output lacks come back as ``None``, so
the report can leave that plot out with a note instead of failing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import urllib.parse
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

LANGUAGES = ("zh", "en")

# Shard columns the report uses; absent ones are skipped.
SHARD_COLUMNS = (
    "key",
    "caption_zh",
    "caption_en",
    "lid_zh",
    "lid_en",
    "width",
    "height",
    "orig_width",
    "orig_height",
    "clip_score_zh",
    "clip_score_en",
)
REJECT_COLUMNS = ("key", "url", "input", "stage", "reason", "detail")

KEY_PATTERN = re.compile(r"\b[0-9a-f]{16}\b")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def match(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def read_columns(paths: list[str], wanted: tuple[str, ...]) -> dict[str, list | None]:
    """Read the named columns of every file; a column missing from any file maps to None."""
    values: dict[str, list | None] = {name: [] for name in wanted}
    for path in paths:
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            present = [name for name in wanted if name in parquet.schema_arrow.names and values[name] is not None]
            table = parquet.read(columns=present)
        for name in wanted:
            if values[name] is None:
                continue
            if name not in present:
                values[name] = None
                continue
            values[name].extend(table.column(name).to_pylist())
    return values


@dataclasses.dataclass
class RunData:
    """The contents of one output folder that the report reads."""

    output: str
    stats: dict[str, Any]
    shards: dict[str, list | None]
    rejects: dict[str, list | None]
    shard_paths: list[str]

    @property
    def kept(self) -> int:
        return len(self.shards["key"] or [])

    @property
    def rejected(self) -> int:
        return len(self.rejects["reason"] or [])


def load_run(output: str) -> RunData:
    """Read ``stats.json``, the shard Parquet files and the rejects of an output folder.

    Raises FileNotFoundError when the folder contains neither a ``stats.json`` nor any shard.
    """
    output = output.rstrip("/") or output
    stats_path = FileSystems.join(output, "stats.json")
    shard_paths = match(FileSystems.join(output, "[0-9]*.parquet"))
    if not FileSystems.exists(stats_path) and not shard_paths:
        raise FileNotFoundError(f"{output} contains no stats.json and no shard Parquet files; is it a curate output folder?")

    stats: dict[str, Any] = {}
    if FileSystems.exists(stats_path):
        with FileSystems.open(stats_path) as handle:
            stats = json.loads(handle.read().decode("utf-8"))

    shards = read_columns(shard_paths, SHARD_COLUMNS)
    rejects = read_columns(match(FileSystems.join(output, "rejects", "*.parquet")), REJECT_COLUMNS)
    return RunData(output=output, stats=stats, shards=shards, rejects=rejects, shard_paths=shard_paths)


# ---------------------------------------------------------------- languages of a row


def has_han(text: str | None) -> bool:
    return bool(text) and _HAN.search(text) is not None


def _input_languages(input_json: str | None) -> set[str]:
    """Return the caption languages of a reject's input row: zh and/or en.

    Captions of unknown language (the ``captions`` list) count as zh when they contain a Han
    character and as en otherwise, which is what language ID decides for nearly all of them.
    """
    try:
        row = json.loads(input_json) if input_json else {}
    except json.JSONDecodeError:
        return set()
    if not isinstance(row, dict):
        return set()
    languages = set()
    if row.get("caption_zh"):
        languages.add("zh")
    if row.get("caption_en"):
        languages.add("en")
    for caption in row.get("captions") or []:
        if isinstance(caption, str) and caption.strip():
            languages.add("zh" if has_han(caption) else "en")
    return languages


def reject_languages(run: RunData) -> list[set[str]]:
    return [_input_languages(text) for text in (run.rejects["input"] or [])]


def kept_languages(run: RunData) -> list[set[str]]:
    zh = run.shards["caption_zh"] or []
    en = run.shards["caption_en"] or []
    return [{lang for lang, caption in (("zh", a), ("en", b)) if caption} for a, b in zip(zh, en)]


# ---------------------------------------------------------------- funnel


def stage_order(run: RunData) -> list[str]:
    """Stages in pipeline order: from stats.json, then any stage only the rejects name."""
    order = [stage["stage"] for stage in run.stats.get("stages", [])]
    for stage in run.rejects["stage"] or []:
        if stage not in order:
            order.append(stage)
    return order


def funnel(run: RunData, language: str | None = None) -> list[dict[str, Any]]:
    """Return per-stage ``in``, ``out`` and ``rejected`` reason counts, recomputed from the files.

    With ``language`` set, only rows that carry a caption of that language count: kept rows that
    still have one, and rejected rows whose input had one. A kept row that lost that caption to
    a caption rule counts in no language funnel for it.
    """
    stages = stage_order(run)
    reasons_by_stage: dict[str, collections.Counter] = {stage: collections.Counter() for stage in stages}
    reject_langs = reject_languages(run) if language else None
    for index, (stage, reason) in enumerate(zip(run.rejects["stage"] or [], run.rejects["reason"] or [])):
        if language and language not in reject_langs[index]:
            continue
        reasons_by_stage[stage][reason] += 1

    if language:
        kept = sum(1 for langs in kept_languages(run) if language in langs)
    else:
        kept = run.kept
    remaining = kept + sum(sum(c.values()) for c in reasons_by_stage.values())

    rows = []
    for stage in stages:
        rejected = dict(sorted(reasons_by_stage[stage].items()))
        out = remaining - sum(rejected.values())
        rows.append({"stage": stage, "in": remaining, "out": out, "rejected": rejected})
        remaining = out
    return rows


# ---------------------------------------------------------------- captions


def script_class(text: str) -> str:
    """Classify a caption by the letters it uses: han, latin, mixed (both) or other (neither)."""
    han = _HAN.search(text) is not None
    latin = _LATIN.search(text) is not None
    if han and latin:
        return "mixed"
    if han:
        return "han"
    if latin:
        return "latin"
    return "other"


def chinese_variant(text: str) -> str:
    """Return simplified, traditional, both (characters shared by the two) or mixed, via hanzidentifier."""
    import hanzidentifier

    names = {
        hanzidentifier.SIMPLIFIED: "simplified",
        hanzidentifier.TRADITIONAL: "traditional",
        hanzidentifier.BOTH: "both",
        hanzidentifier.MIXED: "mixed",
    }
    return names.get(hanzidentifier.identify(text), "no Han")


def caption_distributions(run: RunData) -> dict[str, dict[str, collections.Counter]]:
    """Count lid labels, script classes and (for zh) simplified/traditional per caption slot."""
    result: dict[str, dict[str, collections.Counter]] = {}
    for language in LANGUAGES:
        captions = [c for c in (run.shards[f"caption_{language}"] or []) if c]
        labels = run.shards.get(f"lid_{language}")
        entry = {
            "script": collections.Counter(script_class(c) for c in captions),
            "lid": collections.Counter(label for label in (labels or []) if label) if labels is not None else None,
        }
        if language == "zh":
            entry["variant"] = collections.Counter(chinese_variant(c) for c in captions)
        result[language] = entry
    return result


# ---------------------------------------------------------------- duplicates and downloads


def duplicate_clusters(run: RunData, reason: str) -> list[int] | None:
    """Return the size of every duplicate cluster (kept sample + its rejected copies) for ``reason``.

    Dedup rejects name the kept key in their detail text. A reject of ``reason`` whose detail
    names no key counts as a cluster of two with an unknown kept sample. Returns None when the run
    has no rejects of that reason.
    """
    details = [d for r, d in zip(run.rejects["reason"] or [], run.rejects["detail"] or []) if r == reason]
    if not details:
        return None
    members: collections.Counter = collections.Counter()
    unnamed = 0
    for detail in details:
        found = KEY_PATTERN.search(detail or "")
        if found:
            members[found.group(0)] += 1
        else:
            unnamed += 1
    return sorted([count + 1 for count in members.values()] + [2] * unnamed)


def host_of(url: str | None) -> str:
    try:
        host = urllib.parse.urlsplit(url or "").hostname
    except ValueError:
        host = None
    return host or "(no host)"


def download_errors(run: RunData) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    """Return download rejects by reason, and by host broken down by reason."""
    by_reason: collections.Counter = collections.Counter()
    by_host: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for stage, reason, url in zip(run.rejects["stage"] or [], run.rejects["reason"] or [], run.rejects["url"] or []):
        if stage != "download":
            continue
        by_reason[reason] += 1
        by_host[host_of(url)][reason] += 1
    return by_reason, dict(by_host)


# The detail text of a low_clip_score reject, one clause per failing caption language.
LOW_SCORE_PATTERN = re.compile(r"\b(zh|en) score (-?\d+(?:\.\d+)?|nan) < threshold (-?\d+(?:\.\d+)?)")


def low_score_rejects(run: RunData) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Return the failing scores per language of low_clip_score rejects, and the thresholds they name."""
    scores: dict[str, list[float]] = {language: [] for language in LANGUAGES}
    thresholds: dict[str, float] = {}
    for reason, detail in zip(run.rejects["reason"] or [], run.rejects["detail"] or []):
        if reason != "low_clip_score":
            continue
        for language, score, threshold in LOW_SCORE_PATTERN.findall(detail or ""):
            if score != "nan":
                scores[language].append(float(score))
            thresholds[language] = float(threshold)
    return scores, thresholds


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def clip_thresholds(run: RunData) -> dict[str, float]:
    """Return the CLIP score threshold per language: from stats.json when it records them, else from
    the detail text of the low_clip_score rejects (which also covers thresholds from a top fraction)."""
    thresholds: dict[str, float] = {}
    sources = [run.stats, run.stats.get("options") or {}, run.stats.get("config") or {}]
    for language in LANGUAGES:
        for source in sources:
            value = _number(source.get(f"clip_min_score_{language}"))
            if value is None:
                value = _number(source.get("clip_min_score"))
            if value is not None:
                thresholds[language] = value
                break
    _, from_rejects = low_score_rejects(run)
    for language, value in from_rejects.items():
        thresholds.setdefault(language, value)
    return thresholds

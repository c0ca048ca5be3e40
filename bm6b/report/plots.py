"""The report's figures, drawn with matplotlib's Agg backend (no display needed).

Each ``plot_*`` function returns a ``Figure`` record: the PNG bytes, the numbers it drew (so a
test or a reader can check them against the data), and a note. When the data a figure needs is
absent, ``png`` is None and the note states why.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bm6b.report import data as rd  # noqa: E402

LANGUAGE_COLORS = {"zh": "#c0392b", "en": "#2c6fbb", None: "#555555"}
MAX_HOSTS = 15
DPI = 96


@dataclasses.dataclass
class Figure:
    name: str  # file stem of the PNG
    title: str
    png: bytes | None
    values: dict[str, Any]
    note: str = ""


def _to_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def _missing(name: str, title: str, note: str) -> Figure:
    return Figure(name=name, title=title, png=None, values={}, note=note)


# ---------------------------------------------------------------- funnel


LANGUAGE_FUNNEL_NOTE = (
    "The zh (en) series counts rows that carry a Chinese (English) caption: a rejected row when its input had "
    "one, a kept row when it still has one. A kept row whose caption of that language a caption rule dropped "
    "(listed in its caption_issues) is not counted for that language at any stage, so the zh and en inputs "
    "can be lower than the manifest's caption counts. Rows with both captions count in both."
)


def plot_funnel(run: rd.RunData) -> Figure:
    """Rows left after each stage, overall and for the zh and en captions, as grouped bars."""
    series = {"all": rd.funnel(run), "zh": rd.funnel(run, "zh"), "en": rd.funnel(run, "en")}
    stages = [row["stage"] for row in series["all"]]
    if not stages:
        return _missing("funnel", "Funnel", "stats.json lists no stages and there are no rejects.")

    labels = ["input"] + stages
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.27
    for offset, (name, rows) in enumerate(series.items()):
        counts = [rows[0]["in"]] + [row["out"] for row in rows]
        positions = [i + (offset - 1) * width for i in range(len(labels))]
        bars = ax.bar(positions, counts, width, label=name, color=LANGUAGE_COLORS.get(name, "#555555"))
        ax.bar_label(bars, fontsize=6, rotation=90, padding=2)
    ax.set_ylim(0, series["all"][0]["in"] * 1.15 + 1)
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel("rows remaining")
    ax.set_title("Rows remaining after each stage (all rows, rows with a zh caption, rows with an en caption)")
    ax.legend()
    values = {name: rows for name, rows in series.items()}
    note = LANGUAGE_FUNNEL_NOTE
    return Figure("funnel", "Funnel by stage", _to_png(fig), values, note)


def plot_reject_reasons(run: rd.RunData) -> Figure:
    """Rejected rows per stage and reason, one panel per caption language."""
    per_language = {lang: rd.funnel(run, lang) for lang in rd.LANGUAGES}
    pairs = sorted({(row["stage"], reason) for rows in per_language.values() for row in rows for reason in row["rejected"]},
                   key=lambda pair: (rd.stage_order(run).index(pair[0]), pair[1]))
    if not pairs:
        return _missing("reject_reasons", "Rejects by stage and reason", "No row was rejected.")

    labels = [f"{stage}: {reason}" for stage, reason in pairs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(labels) + 1.5), sharey=True)
    values: dict[str, dict[str, int]] = {}
    for ax, language in zip(axes, rd.LANGUAGES):
        by_pair = {(row["stage"], r): n for row in per_language[language] for r, n in row["rejected"].items()}
        counts = [by_pair.get(pair, 0) for pair in pairs]
        values[language] = {label: count for label, count in zip(labels, counts)}
        bars = ax.barh(range(len(labels)), counts, color=LANGUAGE_COLORS[language])
        ax.bar_label(bars, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"rows with a {language} caption")
        ax.set_xlabel("rejected rows")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].invert_yaxis()  # the axes share y, so one call puts the first stage on top of both
    return Figure("reject_reasons", "Rejects by stage and reason", _to_png(fig), values)


# ---------------------------------------------------------------- CLIP scores


def plot_clip_scores(run: rd.RunData, thresholds: dict[str, float]) -> Figure:
    """Histogram of CLIP scores per language (kept rows, and rejected ones below the threshold),
    with each language's threshold as a dashed line."""
    title = "CLIP score per language"
    scores = {lang: run.shards.get(f"clip_score_{lang}") for lang in rd.LANGUAGES}
    rejected, _ = rd.low_score_rejects(run)
    if all(column is None for column in scores.values()) and not any(rejected.values()):
        return _missing("clip_scores", title, "The shards have no clip_score columns.")
    kept = {lang: [float(s) for s in (column or []) if s is not None and math.isfinite(s)] for lang, column in scores.items()}
    if not any(kept.values()) and not any(rejected.values()):
        return _missing("clip_scores", title, "No row has a CLIP score: the run had no --clip-model.")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    values: dict[str, Any] = {"thresholds": dict(thresholds)}
    for ax, language in zip(axes, rd.LANGUAGES):
        column, low = kept[language], rejected[language]
        values[language] = {"kept": len(column), "rejected": len(low), "min": min(column + low, default=None),
                            "max": max(column + low, default=None)}
        if column or low:
            counts, edges, _ = ax.hist([column, low], bins=30, stacked=True, label=["kept", "rejected"],
                                       color=[LANGUAGE_COLORS[language], "#bbbbbb"])
            values[language]["histogram_kept"] = [int(c) for c in counts[0]]
            values[language]["edges"] = [float(e) for e in edges]
        threshold = thresholds.get(language)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
        if column or low or threshold is not None:
            ax.legend(fontsize=8)
        ax.set_title(f"{language} captions ({len(column)} kept, {len(low)} rejected for a low score)", fontsize=10)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("rows")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    note = ("Rejected scores come from the detail text of low_clip_score rejects, which holds only the "
            "failing language's score.")
    if not thresholds:
        note += " The run used no CLIP threshold, so none is marked."
    return Figure("clip_scores", title, _to_png(fig), values, note)


# ---------------------------------------------------------------- languages and scripts


def plot_languages(run: rd.RunData) -> Figure:
    """Language-ID labels per caption slot, script classes, and simplified/traditional Chinese."""
    distributions = rd.caption_distributions(run)
    if not any(sum(d["script"].values()) for d in distributions.values()):
        return _missing("languages", "Languages and scripts", "No kept caption.")

    panels = [
        ("zh caption: language ID", distributions["zh"]["lid"], "zh"),
        ("en caption: language ID", distributions["en"]["lid"], "en"),
        ("zh caption: script", distributions["zh"]["script"], "zh"),
        ("en caption: script", distributions["en"]["script"], "en"),
        ("zh caption: Chinese variant", distributions["zh"]["variant"], "zh"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.2))
    values: dict[str, dict[str, int]] = {}
    for ax, (title, counter, language) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        if counter is None:
            ax.text(0.5, 0.5, "no lid column", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        items = counter.most_common(8)
        values[title] = dict(counter)
        bars = ax.bar([k for k, _ in items], [v for _, v in items], color=LANGUAGE_COLORS[language])
        ax.bar_label(bars, fontsize=7)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    note = ("Script: han = Han characters only, latin = Latin letters only, mixed = both, other = neither. "
            "Chinese variant from hanzidentifier; 'both' means every character is shared by the two standards.")
    return Figure("languages", "Languages and scripts of the kept captions", _to_png(fig), values, note)


# ---------------------------------------------------------------- images


def plot_image_sizes(run: rd.RunData) -> Figure:
    """Short side and aspect ratio of the original images of the kept rows."""
    width = run.shards.get("orig_width") or run.shards.get("width")
    height = run.shards.get("orig_height") or run.shards.get("height")
    pairs = [(w, h) for w, h in zip(width or [], height or []) if w and h]
    if not pairs:
        return _missing("image_sizes", "Image sizes", "No kept row has an image size.")

    short = [min(w, h) for w, h in pairs]
    ratio = [max(w, h) / min(w, h) for w, h in pairs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    short_counts, short_edges, _ = axes[0].hist(short, bins=30, color="#3c8d5a")
    axes[0].set_xlabel("shorter side of the original, pixels")
    axes[0].set_ylabel("kept rows")
    ratio_counts, ratio_edges, _ = axes[1].hist(ratio, bins=30, color="#8e6c3c")
    axes[1].set_xlabel("aspect ratio (longer / shorter side)")
    for ax in axes:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    values = {
        "count": len(pairs),
        "short_side": {"min": min(short), "max": max(short), "histogram": [int(c) for c in short_counts],
                       "edges": [float(e) for e in short_edges]},
        "aspect_ratio": {"min": min(ratio), "max": max(ratio), "histogram": [int(c) for c in ratio_counts],
                         "edges": [float(e) for e in ratio_edges]},
    }
    return Figure("image_sizes", "Image sizes and aspect ratios (originals, after EXIF rotation)", _to_png(fig), values)


# ---------------------------------------------------------------- duplicates


def plot_duplicate_clusters(run: rd.RunData) -> Figure:
    """Cluster sizes of exact and near-duplicate images (kept sample plus rejected copies)."""
    title = "Duplicate image clusters"
    clusters = {
        "duplicate_image": rd.duplicate_clusters(run, "duplicate_image"),
        "near_duplicate_image": rd.duplicate_clusters(run, "near_duplicate_image"),
    }
    if all(sizes is None for sizes in clusters.values()):
        return _missing("duplicates", title, "No duplicate_image or near_duplicate_image rejects in this run.")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    values: dict[str, Any] = {}
    for ax, (reason, sizes) in zip(axes, clusters.items()):
        ax.set_title(reason.replace("_", " "), fontsize=10)
        if sizes is None:
            ax.text(0.5, 0.5, f"no {reason} rejects", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        histogram: dict[int, int] = {}
        for size in sizes:
            histogram[size] = histogram.get(size, 0) + 1
        values[reason] = {"clusters": len(sizes), "histogram": histogram}
        sizes_seen = sorted(histogram)
        bars = ax.bar(range(len(sizes_seen)), [histogram[s] for s in sizes_seen], color="#7b5ea7")
        ax.set_xticks(range(len(sizes_seen)), [str(s) for s in sizes_seen])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.bar_label(bars, fontsize=7)
        ax.set_xlabel("images in cluster")
        ax.set_ylabel("clusters")
    note = "A cluster is one kept image plus the rejects whose detail names its key."
    return Figure("duplicates", title, _to_png(fig), values, note)


# ---------------------------------------------------------------- downloads


def plot_download_errors(run: rd.RunData) -> Figure:
    """Download rejects by error class, and the hosts with the most errors."""
    by_reason, by_host = rd.download_errors(run)
    if not by_reason:
        return _missing("download_errors", "Download errors", "No row was rejected by the download stage.")

    reasons = [reason for reason, _ in by_reason.most_common()]
    hosts = sorted(by_host, key=lambda h: (-sum(by_host[h].values()), h))[:MAX_HOSTS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.3 * max(len(reasons), len(hosts)) + 2.2))
    bars = axes[0].barh(reasons, [by_reason[r] for r in reasons], color="#b03a2e")
    axes[0].bar_label(bars, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_title("by error class")
    axes[0].set_xlabel("rejected rows")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))

    left = [0] * len(hosts)
    cmap = plt.get_cmap("tab10")
    for index, reason in enumerate(reasons):
        counts = [by_host[h].get(reason, 0) for h in hosts]
        axes[1].barh(hosts, counts, left=left, label=reason, color=cmap(index % 10))
        left = [a + b for a, b in zip(left, counts)]
    axes[1].invert_yaxis()
    axes[1].set_title(f"by host (top {len(hosts)} of {len(by_host)})")
    axes[1].set_xlabel("rejected rows")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=7)
    values = {"by_reason": dict(by_reason), "by_host": {h: dict(by_host[h]) for h in hosts}, "hosts": len(by_host)}
    return Figure("download_errors", "Download errors", _to_png(fig), values)


def all_figures(run: rd.RunData, thresholds: dict[str, float]) -> list[Figure]:
    return [
        plot_funnel(run),
        plot_reject_reasons(run),
        plot_clip_scores(run, thresholds),
        plot_languages(run),
        plot_image_sizes(run),
        plot_duplicate_clusters(run),
        plot_download_errors(run),
    ]

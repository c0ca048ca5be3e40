"""``write_report``: the HTML page and PNG figures of a finished curate run.

Output layout, beside the shards (local path or any Beam file system such as ``gs://``)::

    OUTPUT/report/index.html     the page; open it in a browser
    OUTPUT/report/NAME.png       one file per figure
    OUTPUT/report/figures.json   the numbers behind each figure
"""

from __future__ import annotations

import datetime
import html
import json
import logging
from typing import Any

from apache_beam.io.filesystems import FileSystems

from bm6b.report import data as rd
from bm6b.report.plots import LANGUAGE_FUNNEL_NOTE, Figure, all_figures

logger = logging.getLogger(__name__)

REPORT_DIR = "report"

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.88em; }
.missing { color: #8a5a00; background: #fff6e0; padding: 0.4em 0.8em; }
"""


def _write(path: str, payload: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(payload)


def _summary_rows(stats: dict[str, Any], run: rd.RunData) -> list[tuple[str, str]]:
    captions = stats.get("captions") or {}
    rows = [
        ("input rows", stats.get("input_rows", run.kept + run.rejected)),
        ("kept", stats.get("kept", run.kept)),
        ("rejected", stats.get("rejected", run.rejected)),
        ("shards", stats.get("shards", len(run.shard_paths))),
        ("kept with zh caption", captions.get("zh", "-")),
        ("kept with en caption", captions.get("en", "-")),
        ("kept with both", captions.get("both", "-")),
        ("CLIP model", stats.get("clip_model") or "-"),
        ("run time, s", stats.get("elapsed_s", "-")),
        ("input rows per second", stats.get("samples_per_s", "-")),
    ]
    return [(name, str(value)) for name, value in rows]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _funnel_table(run: rd.RunData) -> str:
    series = {"all": rd.funnel(run), "zh": rd.funnel(run, "zh"), "en": rd.funnel(run, "en")}
    rows = []
    for index, row in enumerate(series["all"]):
        reasons = ", ".join(f"{k} {v}" for k, v in row["rejected"].items()) or "-"
        rows.append([row["stage"], row["in"], row["out"], series["zh"][index]["out"], series["en"][index]["out"], reasons])
    return _table(["stage", "in", "out", "out (zh)", "out (en)", "rejected by reason"], rows)


def _figure_html(figure: Figure) -> str:
    parts = [f"<h2 id=\"{figure.name}\">{html.escape(figure.title)}</h2>"]
    if figure.png is None:
        parts.append(f"<p class=\"missing\">Not drawn: {html.escape(figure.note)}</p>")
        return "\n".join(parts)
    parts.append(f"<img src=\"{figure.name}.png\" alt=\"{html.escape(figure.title)}\">")
    if figure.note:
        parts.append(f"<p class=\"note\">{html.escape(figure.note)}</p>")
    return "\n".join(parts)


def render_html(run: rd.RunData, figures: list[Figure]) -> str:
    title = f"bm6b curate report: {run.output}"
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=\"note\">Generated {generated} from stats.json, {len(run.shard_paths)} shard Parquet file(s) "
        "and rejects/*.parquet.</p>",
        "<h2 id=\"summary\">Summary</h2>",
        _table(["", "value"], [list(row) for row in _summary_rows(run.stats, run)]),
        "<h2 id=\"funnel-table\">Funnel</h2>",
        _funnel_table(run),
        f"<p class=\"note\">{html.escape(LANGUAGE_FUNNEL_NOTE)}</p>",
    ]
    sections.extend(_figure_html(figure) for figure in figures)
    sections.append("</body></html>")
    return "\n".join(sections)


def write_report(output: str, clip_threshold: float | None = None) -> str:
    """Write the report of the curate output in ``output`` and return the path of its index.html.

    ``clip_threshold`` marks the CLIP score histograms of both languages. By default each
    language's threshold comes from stats.json, else from the detail text of its low_clip_score
    rejects.
    """
    run = rd.load_run(output)
    thresholds = rd.clip_thresholds(run)
    if clip_threshold is not None:
        thresholds = {language: clip_threshold for language in rd.LANGUAGES}
    figures = all_figures(run, thresholds)

    folder = FileSystems.join(run.output, REPORT_DIR)
    if not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    for figure in figures:
        if figure.png is not None:
            _write(FileSystems.join(folder, f"{figure.name}.png"), figure.png)
    numbers = {
        figure.name: {"title": figure.title, "drawn": figure.png is not None, "note": figure.note, "values": figure.values}
        for figure in figures
    }
    _write(FileSystems.join(folder, "figures.json"), json.dumps(numbers, indent=1, ensure_ascii=False, default=str).encode())
    index = FileSystems.join(folder, "index.html")
    _write(index, render_html(run, figures).encode("utf-8"))
    skipped = [f.name for f in figures if f.png is None]
    logger.info("report: %s (%d figures%s)", index, len(figures) - len(skipped),
                f"; not drawn: {', '.join(skipped)}" if skipped else "")
    return index


def write_run_report(output: str) -> str | None:
    """Write the report at the end of a curate run; log a failure instead of raising it.

    By the time this runs the shards and stats.json are complete, so a report that cannot be drawn
    must not turn a finished run into a failed one. ``bm6b report OUTPUT`` redraws it later.
    """
    try:
        return write_report(output)
    except Exception:  # noqa: BLE001 (any plotting or I/O failure; the run's data is already written)
        logger.exception("report: could not write the report of %s; rerun it with: bm6b report %s", output, output)
        return None

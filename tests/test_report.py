"""The run report and ``bm6b inspect``: a small output folder with hand-counted numbers.

The folder is written with the real shard writer, the reject schema and compute_stats, so the
report reads exactly what curate writes. The real-data run is checked in test_report_e2e.py.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bm6b.cli import main
from bm6b.filters.clip import check_scores
from bm6b.pipelines.shards import write_shard
from bm6b.pipelines.stats import compute_stats, write_stats
from bm6b.report import data as rd
from bm6b.report.inspect import inspect_shard
from bm6b.report.render import write_report
from bm6b.schemas import REJECT_SCHEMA, make_reject, new_record

KEYS = [f"{i:016x}" for i in range(1, 6)]


def jpeg(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def kept(key: str, zh: str | None, en: str | None, size: tuple[int, int], clip: tuple[float | None, float | None]):
    record = new_record(key=key, uid=key * 2, url=f"http://127.0.0.1:9/{key}.jpg", source="m.tsv", source_row=0,
                        caption_zh=zh, caption_en=en)
    width, height = size
    record.update(image=jpeg(width, height), width=width, height=height, orig_width=width, orig_height=height,
                  lid_zh="zh" if zh else None, lid_en="en" if en else None,
                  clip_score_zh=clip[0], clip_score_en=clip[1], sha256=key * 4, phash=1)
    return record


def low_score(scores: dict[str, float]) -> tuple[str, str]:
    """Return (reason, detail) of a low_clip_score reject, from the CLIP stage's own check at 0.25."""
    record = {f"clip_score_{language}": score for language, score in scores.items()}
    return check_scores(record, {"zh": 0.25, "en": 0.25})


def reject(key: str, url: str, stage: str, reason: str, detail: str | None, zh: str | None, en: str | None):
    source = {"key": key, "uid": key, "url": url, "source": "m.tsv", "source_row": 1,
              "caption_zh": zh, "caption_en": en, "captions": []}
    return make_reject(source, stage=stage, reason=reason, detail=detail or "")


def write_rejects(folder, rows) -> None:
    (folder / "rejects").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA), folder / "rejects" / "rejects-00000-of-00001.parquet")


@pytest.fixture
def small_run(tmp_path):
    """3 kept rows and 8 rejects; every count asserted below was counted by hand from this table.

    kept:  K1 zh+en 400x300, K2 en 200x200, K3 zh 100x300
    rejects: download http_404 (zh+en, host a.test), download http_404 (en, a.test),
             download connect (zh, b.test), captions empty_caption (en),
             dedup_image duplicate_image of K1 (zh+en), dedup_image duplicate_image of K1 (en),
             clip low_clip_score en 0.12 (en), clip low_clip_score zh 0.05 and en 0.2 (zh+en)
    """
    out = tmp_path / "out"
    out.mkdir()
    write_shard(str(out), 0, [
        kept(KEYS[0], "一只猫", "A cat.", (400, 300), (0.31, 0.29)),
        kept(KEYS[1], None, "A dog.", (200, 200), (None, 0.22)),
        kept(KEYS[2], "長城", None, (100, 300), (0.27, None)),
    ])
    write_rejects(out, [
        reject("a" * 16, "http://a.test/1.jpg", "download", "http_404", "", "猫", "cat"),
        reject("b" * 16, "http://a.test/2.jpg", "download", "http_404", "", None, "dog"),
        reject("c" * 16, "http://b.test/3.jpg", "download", "connect", "", "船", None),
        reject("d" * 16, "http://a.test/4.jpg", "captions", "empty_caption", "", None, "   "),
        reject("e" * 16, "http://a.test/5.jpg", "dedup_image", "duplicate_image",
               f"same sha256 as kept key {KEYS[0]}", "猫", "cat"),
        reject("f" * 16, "http://a.test/6.jpg", "dedup_image", "duplicate_image",
               f"same sha256 as kept key {KEYS[0]}", None, "cat"),
        reject("1" * 16, "http://a.test/7.jpg", "clip", *low_score({"en": 0.12}), None, "a dog"),
        reject("2" * 16, "http://a.test/8.jpg", "clip", *low_score({"zh": 0.05, "en": 0.2}), "狗", "dog"),
    ])
    stats = compute_stats(str(out), stages=["ingest", "download", "captions", "lid", "dedup_image", "clip", "write"])
    write_stats(str(out), stats)
    return out


def test_funnel_all_matches_stats(small_run):
    run = rd.load_run(str(small_run))
    stats = json.loads((small_run / "stats.json").read_text())
    assert rd.funnel(run) == stats["stages"]


def test_funnel_per_language(small_run):
    run = rd.load_run(str(small_run))
    zh = {row["stage"]: row for row in rd.funnel(run, "zh")}
    en = {row["stage"]: row for row in rd.funnel(run, "en")}

    # zh: kept K1, K3; rejected: 404 (a), connect (c), duplicate (e), low score (2) -> 6 in.
    assert zh["ingest"]["in"] == 6
    assert zh["download"]["rejected"] == {"connect": 1, "http_404": 1}
    assert zh["captions"]["rejected"] == {}
    assert zh["dedup_image"]["rejected"] == {"duplicate_image": 1}
    assert zh["clip"]["rejected"] == {"low_clip_score": 1}
    assert zh["write"]["out"] == 2

    # en: kept K1, K2; rejected: 404 (a, b), empty_caption (d: its input caption is "   ", which
    # counts as present), duplicates (e, f), low scores (1, 2) -> 9 in.
    assert en["ingest"]["in"] == 9
    assert en["download"]["rejected"] == {"http_404": 2}
    assert en["captions"]["rejected"] == {"empty_caption": 1}
    assert en["dedup_image"]["rejected"] == {"duplicate_image": 2}
    assert en["clip"]["rejected"] == {"low_clip_score": 2}
    assert en["write"]["out"] == 2


def test_duplicate_clusters_and_hosts(small_run):
    run = rd.load_run(str(small_run))
    assert rd.duplicate_clusters(run, "duplicate_image") == [3]
    assert rd.duplicate_clusters(run, "near_duplicate_image") is None

    by_reason, by_host = rd.download_errors(run)
    assert by_reason == {"http_404": 2, "connect": 1}
    assert by_host == {"a.test": {"http_404": 2}, "b.test": {"connect": 1}}


def test_report_files_and_numbers(small_run):
    index = write_report(str(small_run))
    assert index == str(small_run / "report" / "index.html")
    figures = json.loads((small_run / "report" / "figures.json").read_text())

    for name in ("funnel", "reject_reasons", "clip_scores", "languages", "image_sizes", "duplicates", "download_errors"):
        assert figures[name]["drawn"], name
        with Image.open(small_run / "report" / f"{name}.png") as png:
            assert png.format == "PNG"
            assert png.width > 300

    clip = figures["clip_scores"]["values"]
    assert clip["thresholds"] == {"zh": 0.25, "en": 0.25}
    assert clip["zh"]["kept"] == 2
    assert clip["zh"]["rejected"] == 1
    assert clip["en"]["kept"] == 2
    assert clip["en"]["rejected"] == 2
    assert clip["zh"]["min"] == pytest.approx(0.05)
    assert clip["en"]["min"] == pytest.approx(0.12)
    assert clip["en"]["max"] == pytest.approx(0.29)

    sizes = figures["image_sizes"]["values"]
    assert sizes["count"] == 3
    assert sizes["short_side"]["min"] == 100
    assert sizes["short_side"]["max"] == 300
    assert sizes["aspect_ratio"]["max"] == pytest.approx(3.0)

    languages = figures["languages"]["values"]
    assert languages["zh caption: script"] == {"han": 2}
    assert languages["en caption: script"] == {"latin": 2}
    assert languages["zh caption: Chinese variant"] == {"simplified": 1, "traditional": 1}
    assert languages["zh caption: language ID"] == {"zh": 2}

    assert figures["duplicates"]["values"]["duplicate_image"] == {"clusters": 1, "histogram": {"3": 1}}
    assert figures["download_errors"]["values"]["by_host"] == {"a.test": {"http_404": 2}, "b.test": {"connect": 1}}

    page = (small_run / "report" / "index.html").read_text()
    for name in ("funnel", "clip_scores", "download_errors"):
        assert f"src=\"{name}.png\"" in page
    # The per-language columns count the captions the rows still carry, as the note under the table states.
    assert "is not counted for that language at any stage" in page


def test_report_notes_missing_columns(tmp_path):
    """An output without clip columns, without rejects and without stats.json still gets a report."""
    out = tmp_path / "old"
    out.mkdir()
    rows = [{"key": KEYS[0], "caption_zh": None, "caption_en": "A cat.", "width": 10, "height": 20}]
    pq.write_table(pa.Table.from_pylist(rows), out / "00000.parquet")

    write_report(str(out))
    figures = json.loads((out / "report" / "figures.json").read_text())
    assert not figures["clip_scores"]["drawn"]
    assert figures["clip_scores"]["note"] == "The shards have no clip_score columns."
    assert not figures["duplicates"]["drawn"]
    assert not figures["download_errors"]["drawn"]
    assert figures["image_sizes"]["values"]["count"] == 1
    assert not (out / "report" / "clip_scores.png").exists()
    page = (out / "report" / "index.html").read_text()
    assert "Not drawn: The shards have no clip_score columns." in page


def test_report_rejects_non_output_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert not (tmp_path / "report").exists()


def test_report_command(small_run, capsys):
    assert main(["report", str(small_run), "--clip-threshold", "0.3"]) == 0
    assert "report written to" in capsys.readouterr().out
    figures = json.loads((small_run / "report" / "figures.json").read_text())
    assert figures["clip_scores"]["values"]["thresholds"] == {"zh": 0.3, "en": 0.3}


def test_inspect_text_and_html(small_run, tmp_path, capsys):
    text = inspect_shard(str(small_run / "00000.tar"), count=2)
    assert text.count("== ") == 2
    assert f"== {KEYS[0]}" in text
    assert "caption_zh    一只猫" in text

    page = tmp_path / "view.html"
    assert main(["inspect", str(small_run / "00000.parquet"), "--key", KEYS[2], "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    assert f"== {KEYS[2]}" in printed
    assert "長城" in printed
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 1


def test_inspect_errors(small_run, capsys):
    assert main(["inspect", str(small_run / "00000.txt")]) == 2
    assert main(["inspect", str(small_run / "00009.tar")]) == 2
    assert main(["inspect", str(small_run / "00000.tar"), "--key", "0" * 16]) == 2

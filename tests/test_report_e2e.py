"""The report curate writes for the real-data run (1,000 Flickr8k photos), checked against stats.json
and rendered by headless Chromium (Debian package ``chromium``) to a screenshot."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report(flickr8k_run):
    folder = flickr8k_run["output"] / "report"
    figures = json.loads((folder / "figures.json").read_text())
    stats = json.loads((flickr8k_run["output"] / "stats.json").read_text())
    kept = pq.read_table(sorted(flickr8k_run["output"].glob("[0-9]*.parquet"))).to_pylist()
    return {"folder": folder, "figures": figures, "stats": stats, "kept": kept}


def test_curate_wrote_report(report):
    assert (report["folder"] / "index.html").is_file()
    drawn = {name for name, figure in report["figures"].items() if figure["drawn"]}
    # The run has rejects from download (404, connect) and dedup (one duplicate), CLIP scores from
    # the tiny random-init model, and no near-duplicate stage yet.
    assert {"funnel", "reject_reasons", "clip_scores", "languages", "image_sizes", "duplicates",
            "download_errors"} <= drawn


def test_funnel_matches_stats(report):
    funnel = report["figures"]["funnel"]["values"]
    assert funnel["all"] == report["stats"]["stages"]
    assert funnel["zh"][-1]["out"] == report["stats"]["captions"]["zh"]
    assert funnel["en"][-1]["out"] == report["stats"]["captions"]["en"]
    assert funnel["all"][0]["in"] == report["stats"]["input_rows"] == 1004


def test_download_errors_match_stats(report):
    download = next(stage for stage in report["stats"]["stages"] if stage["stage"] == "download")
    values = report["figures"]["download_errors"]["values"]
    assert values["by_reason"] == download["rejected"] == {"connect": 1, "http_404": 2}
    assert sum(sum(counts.values()) for counts in values["by_host"].values()) == 3
    assert set(values["by_host"]) == {"127.0.0.1"}


def test_distributions_match_shards(report):
    kept = report["kept"]
    sizes = report["figures"]["image_sizes"]["values"]
    short = [min(r["orig_width"], r["orig_height"]) for r in kept]
    assert sizes["count"] == report["stats"]["kept"] == len(kept)
    assert sum(sizes["short_side"]["histogram"]) == len(kept)
    assert sizes["short_side"]["min"] == min(short)
    assert sizes["short_side"]["max"] == max(short)

    clip = report["figures"]["clip_scores"]["values"]
    assert clip["zh"]["kept"] == report["stats"]["captions"]["zh"]
    assert clip["en"]["kept"] == report["stats"]["captions"]["en"]
    assert clip["en"]["rejected"] == 0  # the run sets no CLIP threshold
    assert clip["thresholds"] == {}
    assert clip["en"]["min"] == pytest.approx(min(r["clip_score_en"] for r in kept))

    languages = report["figures"]["languages"]["values"]
    assert sum(languages["zh caption: language ID"].values()) == report["stats"]["captions"]["zh"]
    assert languages["en caption: language ID"] == _count(r["lid_en"] for r in kept if r["caption_en"])

    duplicates = report["figures"]["duplicates"]["values"]
    assert duplicates["duplicate_image"] == {"clusters": 1, "histogram": {"2": 1}}


def _count(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def test_report_renders_in_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    screenshot = tmp_path / "report.png"
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3800",
               f"--screenshot={screenshot}", (report["folder"] / "index.html").as_uri()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]

    with Image.open(screenshot) as image:
        assert image.size == (1200, 3800)
        pixels = np.asarray(image.convert("RGB")).astype(int)

    # The page's own text and tables are black and grey; the zh (#c0392b) and en (#2c6fbb) bars
    # appear only when the PNG figures loaded.
    def colored(rgb) -> int:
        return int((np.abs(pixels - np.array(rgb)).sum(axis=2) < 30).sum())

    assert colored((0xC0, 0x39, 0x2B)) > 2000
    assert colored((0x2C, 0x6F, 0xBB)) > 2000

"""``bm6b demo`` on the bundled sample: the funnel, checked by hand once."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from bm6b.cli import main


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    from conftest import network_guard

    output = tmp_path_factory.mktemp("demo") / "out"
    with network_guard():
        assert main(["demo", "--output", str(output)]) == 0
    return output


def test_demo_funnel(demo_output):
    stats = json.loads((demo_output / "stats.json").read_text())
    # 28 bundled files + 5 injected rows (duplicate, 404, refused port, ftp URL, no URL).
    assert stats["input_rows"] == 33
    assert stats["kept"] == 20
    assert stats["rejects_by_reason"] == {
        "caption_filtered": 3,  # "Gravel", "Grass."/"草地。", "palace"/"宫殿": too short in every language
        "connect": 1,  # the closed port
        "decode_error": 2,  # pillow_truncated_jpeg.jpg, pillow_broken.png
        "decompression_bomb": 1,  # pillow_decompression_bomb.gif
        "duplicate_image": 1,  # the cat photo under a second URL
        "empty_caption": 1,  # sklearn_flower.jpg has no caption
        "http_404": 1,
        "invalid_url": 1,  # ftp://
        "missing_url": 1,
        "not_an_image": 1,  # pillow_test-ole-file.doc
    }
    # Chinese captions survive on 11 photos; "砖墙。" and "军装" are below the minimum length.
    assert stats["captions"] == {"zh": 11, "en": 20, "both": 11}


def test_demo_shards_open(demo_output):
    samples = list(wds.WebDataset(str(demo_output / "00000.tar"), shardshuffle=False))
    assert len(samples) == 20
    table = pq.read_table(demo_output / "00000.parquet")
    cat = table.filter(table.column("caption_zh").is_valid()).to_pylist()
    assert "名叫切尔西的猫。" in {row["caption_zh"] for row in cat}
    by_key = {s["__key__"]: s for s in samples}
    rotated = next(r for r in table.to_pylist() if r["url"].endswith("pillow_hopper_orientation_6.jpg"))
    assert by_key[rotated["key"]]["zh.txt"].decode() == "格蕾丝·霍珀的肖像照片。"


def test_readme_shows_the_demo_funnel(demo_output):
    from conftest import REPO_ROOT

    from bm6b.pipelines.stats import format_funnel

    stats = json.loads((demo_output / "stats.json").read_text())
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert format_funnel(stats) in readme

"""Evaluation sets with hostile contents: oversized images, files that are not UTF-8, broken columns."""

from __future__ import annotations

import pytest
from PIL import Image

from bm6b.dedup.evalsets import load_eval_set


def test_decompression_bomb_image_skipped(tmp_path):
    # 15000 x 15000 one-bit pixels compress to about 27 KB but exceed Pillow's bomb limit (2 x MAX_IMAGE_PIXELS).
    Image.new("1", (15000, 15000)).save(tmp_path / "bomb.png")
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "ok.jpg")
    index = load_eval_set(f"mini={tmp_path}")
    assert index.image_ids == ["mini:ok.jpg"]
    assert index.skipped == 1


def test_manifest_not_utf8_names_file(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("image\tcaption\nx.jpg\tcaf\xe9 au lait sur la table\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.tsv is not UTF-8"):
        load_eval_set(str(path))


def test_manifest_broken_captions_list_names_row(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"id": "a", "captions": "a dog on grass"}\n{"id": "b", "captions": "[broken"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"eval.jsonl row 1 \(0-based\): column captions is not a valid JSON list"):
        load_eval_set(str(path))


def test_bomb_skipped_after_pillow_limit_raised(tmp_path, monkeypatch):
    # A curate run with a larger --max-pixels raises Pillow's global limit in this process; the
    # evaluation loader still skips images above its own limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    Image.new("1", (15000, 15000)).save(tmp_path / "bomb.png")
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "ok.jpg")
    index = load_eval_set(f"mini={tmp_path}")
    assert index.image_ids == ["mini:ok.jpg"]
    assert index.skipped == 1

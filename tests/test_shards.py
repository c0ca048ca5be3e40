"""Shard writer: tar members, Parquet rows, atomic names."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from bm6b.pipelines.shards import shard_for_key, write_shard
from bm6b.schemas import make_key, new_record


def jpeg_bytes(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_records():
    a = new_record(key=make_key("m", 0), uid="u0", url="http://e/0", source="m", source_row=0, caption_zh="一只猫", caption_en="a cat")
    b = new_record(key=make_key("m", 1), uid="u1", url="http://e/1", source="m", source_row=1, caption_en="a dog")
    a["image"], b["image"] = jpeg_bytes("red"), jpeg_bytes("blue")
    return [a, b]


def test_write_shard_members_and_rows(tmp_path):
    records = make_records()
    summary = write_shard(str(tmp_path), 3, records)
    assert summary["samples"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00003.parquet", "00003.tar"]

    with tarfile.open(tmp_path / "00003.tar") as tar:
        names = tar.getnames()
    keys = sorted(r["key"] for r in records)
    cat_key = records[0]["key"]
    expected = []
    for key in keys:
        expected.append(f"{key}.jpg")
        if key == cat_key:
            expected.append(f"{key}.zh.txt")
        expected += [f"{key}.en.txt", f"{key}.json"]
    assert names == expected

    samples = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "00003.tar"), shardshuffle=False)}
    assert samples[cat_key]["zh.txt"].decode() == "一只猫"
    assert "zh.txt" not in samples[records[1]["key"]]

    table = pq.read_table(tmp_path / "00003.parquet")
    assert table.column("key").to_pylist() == keys
    assert table.column("shard").to_pylist() == ["00003", "00003"]
    assert "image" not in table.column_names


def test_rewrite_leaves_no_temporary_files(tmp_path):
    write_shard(str(tmp_path), 0, make_records())
    write_shard(str(tmp_path), 0, make_records()[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tar"]
    assert pq.read_table(tmp_path / "00000.parquet").num_rows == 1


def test_shard_assignment_is_balanced():
    counts = [0] * 4
    for row in range(4000):
        counts[shard_for_key(make_key("manifest.parquet", row), 4)] += 1
    assert all(900 < c < 1100 for c in counts), counts


def test_embeddings_stay_out_of_the_tar_json(tmp_path):
    records = make_records()
    records[0]["clip_image_embedding"] = [0.5, -0.25]
    write_shard(str(tmp_path), 0, records)
    samples = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)}
    assert "clip_image_embedding" not in json.loads(samples[records[0]["key"]]["json"])
    table = pq.read_table(tmp_path / "00000.parquet")
    embeddings = dict(zip(table.column("key").to_pylist(), table.column("clip_image_embedding").to_pylist()))
    assert embeddings[records[0]["key"]] == [0.5, -0.25]

"""The representative rule as node ids: order and parsing, alone and inside the near-image step."""

from __future__ import annotations

import random

from bm6b.dedup import DedupNearImages, DedupUrls
from bm6b.dedup.rank import keep_rank, node_extra, node_id, node_key
from test_dedup_beam import make, run_transform


def test_node_order_matches_keep_rank():
    # Keys of mixed length, one a prefix of another, and keys with "|" or other punctuation.
    keys = ["a", "a0", "a|", "a|b", "ab", "b", "0", "00", "a-1", "a.b", "Z", "a~"]
    rng = random.Random(5)
    records = []
    for key in keys:
        record = make("0000000000000001", caption_en="x")
        record["key"] = key
        record["orig_width"] = rng.choice([10, 20])
        record["orig_height"] = 10
        records.append(record)
    by_rank = [r["key"] for r in sorted(records, key=keep_rank)]
    by_node = [node_key(n) for n in sorted(node_id(r, extra="00ff") for r in records)]
    assert by_node == by_rank


def test_node_key_and_extra_round_trip():
    record = make("0000000000000001", caption_en="x")
    record["key"] = "shard|7|a"
    node = node_id(record, extra="8f3c5a1077e2c419")
    assert node_key(node) == "shard|7|a"
    assert node_extra(node) == "8f3c5a1077e2c419"
    plain = node_id(record)
    assert node_key(plain) == "shard|7|a"
    assert node_extra(plain) == ""


def test_near_images_keep_prefix_key_as_urls_do():
    # Equal rank apart from the key: the shorter key "a" sorts first, as in DedupUrls.
    url = "http://127.0.0.1/same.jpg"
    rows = [make("0000000000000001", phash=5, caption_en="x", url=url),
            make("0000000000000002", phash=5, caption_en="y", url=url)]
    rows[0]["key"], rows[1]["key"] = "a0", "a"
    assert [r["key"] for r in run_transform(DedupUrls(), rows)["records"]] == ["a"]
    out = run_transform(DedupNearImages(radius=2), rows)
    assert [r["key"] for r in out["records"]] == ["a"]
    assert [r["detail"] for r in out["rejects"]] == ["near duplicate of kept key a (pHash Hamming distance 0)"]


def test_near_images_detail_with_pipe_in_key():
    # 5 ^ 6 = 0b011: distance 2. The kept key and the distance come from the whole key.
    rows = [make("0000000000000001", phash=5, caption_en="x", orig_width=20, orig_height=20),
            make("0000000000000002", phash=6, caption_en="y", orig_width=10, orig_height=10)]
    rows[0]["key"] = "x|1"
    out = run_transform(DedupNearImages(radius=2), rows)
    assert [r["key"] for r in out["records"]] == ["x|1"]
    assert [r["detail"] for r in out["rejects"]] == ["near duplicate of kept key x|1 (pHash Hamming distance 2)"]

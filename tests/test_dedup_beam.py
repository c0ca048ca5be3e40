"""The dedup PTransforms on small hand-built inputs, on the in-process Beam runner."""

from __future__ import annotations

import logging
import os
import pickle
import random
import tempfile

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from bm6b.dedup import DedupCaptions, DedupExactImages, DedupNearImages, DedupUrls, Decontaminate
from bm6b.dedup.components import ConnectedComponents, large_star, small_star
from bm6b.dedup.evalsets import EvalIndex
from bm6b.dedup import phash as ph
from bm6b.dedup.transforms import _BandChunks
from bm6b.schemas import new_record

def _dump(path: str):
    def write(items):
        with open(path, "wb") as handle:
            pickle.dump(items, handle)

    return write


def run_transform(transform, inputs) -> dict[str, list]:
    """Run ``transform`` over ``inputs``; return its records and rejects (or its single output)."""
    with tempfile.TemporaryDirectory() as folder:
        names = []
        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
            out = pipeline | beam.Create(inputs, reshuffle=False) | transform
            outputs = {"records": out.records, "rejects": out.rejects} if hasattr(out, "records") else {"output": out}
            for name, pcoll in outputs.items():
                names.append(name)
                _ = pcoll | f"{name}List" >> beam.combiners.ToList() | f"{name}Dump" >> beam.Map(_dump(os.path.join(folder, name)))
        result = {}
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                result[name] = pickle.load(handle)
        return result


def make(key: str, **fields) -> dict:
    record = new_record(key=key, uid=key * 2, url=fields.pop("url", f"http://127.0.0.1/{key}.jpg"), source="m.tsv",
                        source_row=int(key, 16) % 1000)
    record.update(fields)
    return record


def test_star_rounds_by_hand():
    assert list(large_star(("b", ["a", "c", "d"]))) == [("c", "a"), ("d", "a")]
    assert list(large_star(("a", ["b"]))) == [("b", "a")]
    assert sorted(small_star(("d", ["b", "c"]))) == [("c", "b"), ("d", "b")]
    assert list(small_star(("b", ["a"]))) == [("b", "a")]


def test_components_of_chain_star_and_pair():
    chain = [(f"c{i:03d}", f"c{i + 1:03d}") for i in range(60)]
    random.Random(3).shuffle(chain)
    star = [("s00", f"s{i:02d}") for i in range(1, 30)]
    pair = [("p2", "p1"), ("p1", "p2"), ("p1", "p1")]
    out = run_transform(ConnectedComponents(rounds=8), chain + star + pair)["output"]
    labels = dict(out)
    assert len(out) == len(labels) == 60 + 29 + 1
    assert {labels[f"c{i:03d}"] for i in range(1, 61)} == {"c000"}
    assert {labels[f"s{i:02d}"] for i in range(1, 30)} == {"s00"}
    assert labels["p2"] == "p1"
    assert "c000" not in labels
    assert "s00" not in labels
    assert "p1" not in labels


def test_dedup_urls_keeps_bilingual_row():
    rows = [
        make("00000000000000a1", url="HTTP://Example.COM:80/cat.jpg?utm_source=x#top", caption_en="a cat"),
        make("00000000000000a2", url="http://example.com/cat.jpg", caption_en="a cat", caption_zh="一只猫"),
        make("00000000000000a3", url="http://example.com/cat.jpg?size=2", caption_en="a cat"),
    ]
    out = run_transform(DedupUrls(), rows)
    assert sorted(r["key"] for r in out["records"]) == ["00000000000000a2", "00000000000000a3"]
    [reject] = out["rejects"]
    assert reject["key"] == "00000000000000a1"
    assert reject["reason"] == "duplicate_url"
    assert reject["stage"] == "dedup_url"
    assert reject["detail"] == "same normalized URL as kept key 00000000000000a2"


def test_dedup_exact_images_by_sha256():
    rows = [make("00000000000000b1", sha256="s1", caption_en="x"), make("00000000000000b2", sha256="s1", caption_en="y"),
            make("00000000000000b3", sha256="s2", caption_en="z")]
    out = run_transform(DedupExactImages(), rows)
    assert sorted(r["key"] for r in out["records"]) == ["00000000000000b1", "00000000000000b3"]
    assert [(r["key"], r["reason"], r["detail"]) for r in out["rejects"]] == [
        ("00000000000000b2", "duplicate_image", "same sha256 as kept key 00000000000000b1")
    ]


def test_missing_sha256_and_url_never_match():
    # Rows without a sha256 or a URL cannot be compared, so each stays on its own.
    rows = [make("00000000000000c1", sha256=None, url=None, caption_en="x"),
            make("00000000000000c2", sha256=None, url=None, caption_en="y"),
            make("00000000000000c3", sha256="s1", url="", caption_en="z")]
    images = run_transform(DedupExactImages(), rows)
    assert sorted(r["key"] for r in images["records"]) == ["00000000000000c1", "00000000000000c2", "00000000000000c3"]
    assert images["rejects"] == []
    urls = run_transform(DedupUrls(), rows)
    assert sorted(r["key"] for r in urls["records"]) == ["00000000000000c1", "00000000000000c2", "00000000000000c3"]
    assert urls["rejects"] == []


@pytest.mark.parametrize("candidates", ["auto", "pigeonhole", "sampled"])
def test_near_images_cluster_and_representative(candidates):
    base = 0x8F3C_5A10_77E2_C419
    far = 0x1234_5678_9ABC_DEF0
    rows = [
        # Cluster 1: the bilingual, larger image is kept although its key sorts last.
        make("00000000000000c1", phash=base, orig_width=100, orig_height=100, caption_en="a"),
        make("00000000000000c2", phash=base ^ 0b111, orig_width=400, orig_height=300, caption_en="b", caption_zh="乙"),
        make("00000000000000c3", phash=base ^ 0xFF00, orig_width=400, orig_height=300, caption_en="c"),
        # Chained: 8 bits from c3, 16 bits from the kept c2 (distance reported to the kept key).
        make("00000000000000c4", phash=base ^ 0xFF00 ^ 0xFF_0000_0000, orig_width=50, orig_height=50, caption_en="d"),
        # Alone: far from everything, and one record without a pHash.
        make("00000000000000c5", phash=far, orig_width=10, orig_height=10, caption_en="e"),
        make("00000000000000c6", phash=None, caption_en="f"),
    ]
    out = run_transform(DedupNearImages(radius=8, candidates=candidates), rows)
    assert sorted(r["key"] for r in out["records"]) == ["00000000000000c2", "00000000000000c5", "00000000000000c6"]
    details = {r["key"]: r["detail"] for r in out["rejects"]}
    assert details == {
        "00000000000000c1": "near duplicate of kept key 00000000000000c2 (pHash Hamming distance 3)",
        "00000000000000c3": "near duplicate of kept key 00000000000000c2 (pHash Hamming distance 11)",
        "00000000000000c4": "near duplicate of kept key 00000000000000c2 (pHash Hamming distance 19)",
    }
    assert {r["reason"] for r in out["rejects"]} == {"near_duplicate_image"}
    assert {r["stage"] for r in out["rejects"]} == {"dedup_near_image"}


def test_near_images_with_bands_split_into_parts(monkeypatch, caplog):
    # With at most 2 codes per (band, part) group, 40 codes split each band into 20 parts. The
    # clusters must be the same as with one part: ten clusters of four codes, 1-3 bits apart.
    monkeypatch.setattr(ph, "GROUP_CODES", 2)
    rng = random.Random(7)
    rows, expected_kept = [], set()
    for cluster in range(10):
        center = rng.getrandbits(64)
        for member in range(4):
            code = center ^ sum(1 << bit for bit in rng.sample(range(64), member))
            key = f"{cluster * 4 + member + 1:016x}"
            # Member 0 has the largest image, so it is the kept sample of its cluster.
            rows.append(make(key, phash=code, orig_width=100 - member, orig_height=100, caption_en=key))
            if member == 0:
                expected_kept.add(key)
    with caplog.at_level(logging.INFO, logger="bm6b.dedup.transforms"):
        out = run_transform(DedupNearImages(radius=6, candidates="pigeonhole"), rows)
    assert "40 distinct pHash codes, pigeonhole scheme with 7 bands of 9-10 bits, 20 parts per band" in caplog.text
    assert {r["key"] for r in out["records"]} == expected_kept
    assert len(out["rejects"]) == 30


def test_near_images_equal_codes_without_neighbors():
    # Records with the same pHash share a cluster even when no other code is near; the largest
    # image is kept. A lone code next to them stays.
    code = 0xF000_0000_0000_0001
    rows = [
        make("00000000000000d1", phash=code, orig_width=10, orig_height=10, caption_en="a"),
        make("00000000000000d2", phash=code, orig_width=30, orig_height=30, caption_en="b"),
        make("00000000000000d3", phash=code, orig_width=20, orig_height=20, caption_en="c"),
        make("00000000000000d4", phash=code ^ 0xFFFF_0000, orig_width=5, orig_height=5, caption_en="d"),
    ]
    out = run_transform(DedupNearImages(radius=6), rows)
    assert sorted(r["key"] for r in out["records"]) == ["00000000000000d2", "00000000000000d4"]
    details = {r["key"]: r["detail"] for r in out["rejects"]}
    assert details == {
        "00000000000000d1": "near duplicate of kept key 00000000000000d2 (pHash Hamming distance 0)",
        "00000000000000d3": "near duplicate of kept key 00000000000000d2 (pHash Hamming distance 0)",
    }


def test_band_chunks_follow_the_count():
    code = 0x0123_4567_89AB_CDEF
    # 1,000 codes, sampled: round(log2 1000) + 2 = 12 bits, 15 tables at radius 6 (see
    # test_sampled_tables_for_count_by_hand); pigeonhole: radius + 1 = 7 bands.
    sampled = list(_BandChunks(6, "sampled", None).process([code, 5], count=1000))
    assert [key for key, _ in sampled] == [(band, 0) for band in range(15)]
    exact = list(_BandChunks(6, "auto", None).process([code, 5], count=1000))
    assert [key for key, _ in exact] == [(band, 0) for band in range(7)]
    # Pigeonhole band 0 is the lowest 10 bits: 0xCDEF & 0x3FF = 0x1EF.
    codes, values = exact[0][1]
    assert codes.tolist() == [code, 5]
    assert values.tolist() == [0x1EF, 5]


def test_band_chunks_split_large_runs_into_parts():
    # 3.5M distinct codes need 4 parts of at most about GROUP_CODES codes per band.
    assert ph.band_parts(3_500_000) == 4
    codes = np.arange(1, 2001, dtype=np.uint64) * np.uint64(0x9E37_79B9)
    chunks = list(_BandChunks(6, "pigeonhole", None).process(codes.view(np.int64).tolist(), count=3_500_000))
    assert {band for (band, _), _ in chunks} == set(range(7))
    for band in range(7):
        parts = [(part, c, v) for (b, part), (c, v) in chunks if b == band]
        assert sorted(np.concatenate([c for _, c, _ in parts]).tolist()) == sorted(codes.tolist())
        for part, _, values in parts:
            # Equal band values always land in the same part.
            assert set(ph.part_of(values, 4).tolist()) == {part}


def test_near_images_rejects_bad_table_bits():
    with pytest.raises(ValueError, match="invalid bits per table 60"):
        DedupNearImages(radius=6, candidates="sampled", sampled_bits=60)
    with pytest.raises(ValueError, match="unknown candidate scheme"):
        DedupNearImages(radius=6, candidates="lsh")


def test_near_images_radius_is_inclusive():
    base = 0xF0F0_F0F0_F0F0_F0F0
    rows = [make("00000000000000d1", phash=base, caption_en="a"),
            make("00000000000000d2", phash=base ^ 0xF, caption_en="b"),
            make("00000000000000d3", phash=base ^ 0x1F0000, caption_en="c")]
    out = run_transform(DedupNearImages(radius=4), rows)
    # d2 is 4 bits from d1 (merged), d3 is 5 bits from d1 and 9 from d2 (kept).
    assert sorted(r["key"] for r in out["records"]) == ["00000000000000d1", "00000000000000d3"]


def test_captions_exact_and_near_per_language():
    rows = [
        # zh exact duplicates after t2s, width folding and punctuation removal.
        make("00000000000000e1", caption_zh="一只小狗在草地上奔跑。"),
        make("00000000000000e2", caption_zh="一隻小狗在草地上奔跑！"),
        make("00000000000000e3", caption_zh="一只小狗 在 草地上 奔跑"),
        # en near duplicates: one word appended.
        make("00000000000000e4", caption_en="A brown dog is running through the tall green grass in the park ."),
        make("00000000000000e5", caption_en="a brown dog is running through the tall green grass in the park today"),
        # A bilingual record whose zh is a duplicate but whose en is its own: kept.
        make("00000000000000e6", caption_zh="一只小狗在草地上奔跑", caption_en="Puppy on a lawn"),
        # Different short Chinese captions stay apart.
        make("00000000000000e7", caption_zh="一只黑猫"),
        make("00000000000000e8", caption_zh="一只白猫"),
    ]
    out = run_transform(DedupCaptions(threshold=0.8), rows)
    kept = sorted(r["key"] for r in out["records"])
    # e6 is bilingual, so it represents the zh cluster and e1..e3 all go.
    assert kept == ["00000000000000e4", "00000000000000e6", "00000000000000e7", "00000000000000e8"]
    details = {r["key"]: r["detail"] for r in out["rejects"]}
    assert details == {
        "00000000000000e1": "caption_zh duplicates kept key 00000000000000e6",
        "00000000000000e2": "caption_zh duplicates kept key 00000000000000e6",
        "00000000000000e3": "caption_zh duplicates kept key 00000000000000e6",
        "00000000000000e5": "caption_en duplicates kept key 00000000000000e4",
    }
    assert {r["reason"] for r in out["rejects"]} == {"duplicate_caption"}


def test_decontaminate_by_image_and_caption():
    index = EvalIndex(phashes=[0xAAAA_AAAA_AAAA_AAAA], image_ids=["coco:val/1.jpg"], captions={"一只猫坐在沙发上": "coco-cn:7"})
    rows = [
        make("00000000000000f1", phash=0xAAAA_AAAA_AAAA_AAAA ^ 0b11, caption_en="x"),
        make("00000000000000f2", phash=0x5555_5555_5555_5555, caption_zh="一隻貓坐在沙發上。"),
        make("00000000000000f3", phash=0x5555_5555_5555_5555, caption_zh="一只狗"),
    ]
    out = run_transform(Decontaminate(index, radius=8), rows)
    assert [r["key"] for r in out["records"]] == ["00000000000000f3"]
    details = {r["key"]: r["detail"] for r in out["rejects"]}
    assert details == {
        "00000000000000f1": "image within pHash Hamming distance 2 of eval image coco:val/1.jpg",
        "00000000000000f2": "caption_zh equals a caption of eval item coco-cn:7",
    }
    assert {r["reason"] for r in out["rejects"]} == {"eval_contamination"}

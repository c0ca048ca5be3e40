"""End to end on real data: 1,000 Flickr8k photos with English and Chinese captions, from 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import unicodedata

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.fftpack
import webdataset as wds
from PIL import Image, ImageOps

from flickr8k import DUPLICATE_OF

pytestmark = pytest.mark.slow


def reference_phash(data: bytes) -> int:
    """pHash written out from its definition: 32x32 grey, 2-D DCT-II, 8x8 low band > median."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").convert("L")
    pixels = np.asarray(image.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def nfkc(text: str) -> str:
    """NFKC with collapsed spaces, except Chinese full-width punctuation after a Han character stays."""
    kept = []
    for i, ch in enumerate(text):
        after_han = i > 0 and "\u4e00" <= text[i - 1] <= "\u9fff"
        kept.append(ch if after_han and ch in "，！？：；（）" else unicodedata.normalize("NFKC", ch))
    return " ".join("".join(kept).split())


@pytest.fixture(scope="module")
def run(flickr8k_run):
    out = flickr8k_run["output"]
    kept = pq.read_table(sorted(out.glob("[0-9]*.parquet"))).to_pylist()
    rejects = pq.read_table(sorted((out / "rejects").glob("*.parquet"))).to_pylist()
    return {**flickr8k_run, "kept": kept, "rejects": rejects}


def test_every_row_accounted_for(run):
    assert run["rows"] == 1004
    assert len(run["kept"]) + len(run["rejects"]) == run["rows"]
    kept_keys = {r["key"] for r in run["kept"]}
    reject_keys = {r["key"] for r in run["rejects"]}
    assert not kept_keys & reject_keys
    assert len(kept_keys) + len(reject_keys) == run["rows"]
    assert run["stats"]["input_rows"] == run["rows"]
    assert run["stats"]["kept"] == len(run["kept"]) == 1000


def test_stats_funnel_adds_up(run):
    stats = json.loads((run["output"] / "stats.json").read_text())
    previous_out = stats["input_rows"]
    for stage in stats["stages"]:
        assert stage["in"] == previous_out, stage
        assert stage["out"] == stage["in"] - sum(stage["rejected"].values()), stage
        previous_out = stage["out"]
    assert previous_out == stats["kept"]
    assert stats["rejects_by_reason"] == {"connect": 1, "duplicate_image": 1, "http_404": 2}


def test_dead_links_rejected_by_download(run):
    by_url = {r["url"]: r for r in run["rejects"]}
    reasons = [by_url[url]["reason"] for url in run["dead_urls"]]
    assert reasons == ["http_404", "http_404", "connect"]
    assert all(by_url[url]["stage"] == "download" for url in run["dead_urls"])


def test_duplicate_image_names_kept_key(run):
    duplicates = [r for r in run["rejects"] if r["reason"] == "duplicate_image"]
    assert len(duplicates) == 1
    assert duplicates[0]["url"] == run["duplicate_url"]
    original = next(r for r in run["kept"] if r["url"].endswith("/" + DUPLICATE_OF))
    assert duplicates[0]["detail"] == f"same sha256 as kept key {original['key']}"


def test_captions_land_in_their_language_files(run):
    shards = sorted(str(p) for p in run["output"].glob("*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    assert len(samples) == 1000
    by_url = {r["url"]: r for r in run["kept"]}

    # Checked by hand against flickr8kenc/flickr8kzhc: the first photo, caption #0 of each.
    first = by_url[next(u for u in by_url if u.endswith("/1000268201_693b08cb0e.jpg"))]
    sample = samples[first["key"]]
    assert sample["zh.txt"].decode() == "穿着连衣裙的小女孩。"
    assert sample["en.txt"].decode() == "A child in a pink dress is climbing up a set of stairs in an entry way ."
    assert json.loads(sample["json"])["lid_zh"] == "zh"

    for name in run["images"]:
        record = by_url[f"{run['base_url']}/{name}"]
        sample = samples[record["key"]]
        assert sample["zh.txt"].decode() == nfkc(run["chinese"][name])
        assert sample["en.txt"].decode() == nfkc(run["english"][name])
        assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"


def test_sha256_and_phash_match_independent_values(run, shared_raw):
    by_name = {r["url"].rsplit("/", 1)[1]: r for r in run["kept"]}
    for name in run["images"][:50]:
        data = (shared_raw / "flickr8k-images" / "images" / name).read_bytes()
        record = by_name[name]
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["phash"] == reference_phash(data)
        with Image.open(io.BytesIO(data)) as original:
            assert (record["orig_width"], record["orig_height"]) == original.size


def test_shards_open_with_pyarrow_and_match_tars(run):
    for parquet in sorted(run["output"].glob("[0-9]*.parquet")):
        table = pq.read_table(parquet)
        tar = parquet.with_suffix(".tar")
        keys = [s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False)]
        assert keys == table.column("key").to_pylist()
        assert set(table.column("shard").to_pylist()) == {parquet.stem}
        assert set(table.column("clip_model").to_pylist()) == {"bm6b-tiny:random-init"}

"""``run_curate`` with CLIP scoring on, a top-fraction threshold and kept embeddings, on real Flickr8k photos.

60 photos are served from 127.0.0.1. English captions keep their top 50 %; Chinese captions have
no threshold. Expected values are recomputed here from the written output and from open_clip.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from bm6b.filters.download import FetchConfig
from bm6b.models.loading import RANDOM_INIT_SEED
from bm6b.pipelines.curate import CurateConfig, run_curate
from clip_helpers import open_clip_model, reference_scores
from flickr8k import read_captions

pytestmark = pytest.mark.slow

PHOTOS = 60
DETAIL = re.compile(r"^en score (-?\d+\.\d{4}) < threshold (-?\d+\.\d{4}) \(top 50\.0% of en scores\)$")


@pytest.fixture(scope="module")
def curated(shared_raw, tmp_path_factory):
    from conftest import LocalServer

    folder = tmp_path_factory.mktemp("clip_curate")
    images = sorted((shared_raw / "flickr8k-images" / "images").glob("*.jpg"))[:PHOTOS]
    english = read_captions(shared_raw / "flickr8k-cn" / "flickr8kenc.caption.txt", "enc")
    chinese = read_captions(shared_raw / "flickr8k-cn" / "flickr8kzhc.caption.txt", "zhc")
    server = LocalServer(shared_raw / "flickr8k-images" / "images")
    try:
        rows = [{"url": server.url(p.name), "caption_en": english[p.name], "caption_zh": chinese.get(p.name)} for p in images]
        manifest = folder / "manifest.parquet"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
        config = CurateConfig(
            inputs=[str(manifest)],
            output=str(folder / "out"),
            fetch=FetchConfig(allow_networks=("127.0.0.0/8",), timeout=5.0),
            clip_model="bm6b-tiny",
            clip_top_fraction_en=0.5,
            clip_keep_embeddings=True,
            clip_batch_size=16,
            samples_per_shard=40,
        )
        stats = run_curate(config)
    finally:
        server.close()
    out = folder / "out"
    kept = pq.read_table(sorted(out.glob("[0-9]*.parquet"))).to_pylist()
    rejects = pq.read_table(sorted((out / "rejects").glob("*.parquet"))).to_pylist()
    return {"out": out, "stats": stats, "kept": kept, "rejects": rejects}


def test_funnel_counts_clip_rejects(curated):
    stats = curated["stats"]
    assert stats["input_rows"] == PHOTOS
    assert stats["kept"] + stats["rejected"] == PHOTOS
    clip_stage = next(s for s in stats["stages"] if s["stage"] == "clip")
    low = [r for r in curated["rejects"] if r["reason"] == "low_clip_score"]
    assert clip_stage["rejected"] == {"low_clip_score": len(low)}
    assert all(r["stage"] == "clip" for r in low)
    assert clip_stage["out"] == len(curated["kept"])


def test_top_half_of_english_scores_kept(curated):
    kept_scores = [r["clip_score_en"] for r in curated["kept"]]
    rejected = [DETAIL.match(r["detail"]) for r in curated["rejects"] if r["reason"] == "low_clip_score"]
    assert all(rejected), [r["detail"] for r in curated["rejects"]]
    rejected_scores = [float(m.group(1)) for m in rejected]
    thresholds = {m.group(2) for m in rejected}
    assert len(thresholds) == 1

    # The threshold is the lower 50 % quantile of every English score in the run.
    all_scores = np.array(kept_scores + rejected_scores)
    expected = np.quantile(all_scores, 0.5, method="lower")
    assert float(thresholds.pop()) == pytest.approx(expected, abs=1e-4)
    assert min(kept_scores) >= expected - 1e-4
    assert len(kept_scores) == len(all_scores) - int(np.floor(0.5 * (len(all_scores) - 1)))


def test_scores_match_open_clip_on_stored_images(curated):
    shards = sorted(str(p) for p in curated["out"].glob("*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    records = [
        {"key": key, "image": s["jpg"], "caption_zh": s.get("zh.txt", b"").decode() or None, "caption_en": s["en.txt"].decode()}
        for key, s in samples.items()
    ]
    expected = reference_scores(*open_clip_model("bm6b-tiny", seed=RANDOM_INIT_SEED), records)
    by_key = {r["key"]: r for r in curated["kept"]}
    for key, languages in expected.items():
        assert by_key[key]["clip_score_en"] == pytest.approx(languages["en"], abs=1e-5)
        if "zh" in languages:
            assert by_key[key]["clip_score_zh"] == pytest.approx(languages["zh"], abs=1e-5)
        assert by_key[key]["clip_model"] == "bm6b-tiny:random-init"
        row = json.loads(samples[key]["json"])
        assert row["clip_score_en"] == pytest.approx(languages["en"], abs=1e-5)


def test_embeddings_in_parquet(curated):
    table = pq.read_table(sorted(curated["out"].glob("[0-9]*.parquet")))
    assert table.schema.field("clip_image_embedding").type == pa.list_(pa.float16())
    for record in curated["kept"]:
        image = np.array(record["clip_image_embedding"], dtype=np.float64)
        text = np.array(record["clip_text_embedding_en"], dtype=np.float64)
        assert image.shape == (64,)
        assert np.linalg.norm(image) == pytest.approx(1.0, abs=2e-3)
        # The stored score is the cosine of the stored embeddings, up to float16 rounding.
        assert float(image @ text) == pytest.approx(record["clip_score_en"], abs=2e-3)

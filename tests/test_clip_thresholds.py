"""CLIP thresholds: absolute per language, top fraction per language over the run, and the CLI mapping.

Expected kept sets come from numpy (``numpy.quantile(..., method="lower")``), not from the code
under test.
"""

from __future__ import annotations

import argparse
import json
import math

import apache_beam as beam
import numpy as np
import pytest

from bm6b.filters.clip import ClipThresholds, check_scores, threshold_from_quantiles
from bm6b.pipelines.cli import add_curate_arguments, config_from_args
from bm6b.pipelines.clip_inference import ClipModelSpec, FilterClipScores, stage_config_from_curate


def scored_records(count_en: int, count_zh: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(max(count_en, count_zh)):
        records.append({
            "key": f"{i:016x}",
            "clip_score_en": float(rng.uniform(-0.1, 0.4)) if i < count_en else None,
            "clip_score_zh": float(rng.uniform(0.0, 0.3)) if i < count_zh else None,
            "clip_models": {"en": "m"},
        })
    return records


def run_filter(records: list[dict], thresholds: ClipThresholds, folder) -> tuple[dict, list[dict]]:
    pipeline = beam.Pipeline(runner="FnApiRunner")
    result = pipeline | beam.Create(records) | FilterClipScores(thresholds)
    _ = result.records | "Kept" >> beam.Map(json.dumps) | "WriteKept" >> beam.io.WriteToText(str(folder / "kept"))
    _ = result.rejects | "Rejected" >> beam.Map(json.dumps) | "WriteRejects" >> beam.io.WriteToText(str(folder / "rejects"))
    pipeline.run().wait_until_finish()

    def read(prefix):
        return [json.loads(line) for path in sorted(folder.glob(f"{prefix}-*")) for line in path.read_text().splitlines()]

    return {r["key"]: r for r in read("kept")}, read("rejects")


def test_top_fraction_per_language(tmp_path):
    records = scored_records(count_en=1000, count_zh=400)
    thresholds = ClipThresholds(top_fraction={"en": 0.3, "zh": 0.5})
    kept, rejects = run_filter(records, thresholds, tmp_path)

    en_scores = np.array([r["clip_score_en"] for r in records if r["clip_score_en"] is not None])
    zh_scores = np.array([r["clip_score_zh"] for r in records if r["clip_score_zh"] is not None])
    en_threshold = np.quantile(en_scores, 0.7, method="lower")
    zh_threshold = np.quantile(zh_scores, 0.5, method="lower")
    expected = {
        r["key"]
        for r in records
        if r["clip_score_en"] >= en_threshold and (r["clip_score_zh"] is None or r["clip_score_zh"] >= zh_threshold)
    }
    assert set(kept) == expected
    assert len(kept) + len(rejects) == 1000
    # 1000 distinct English scores: N - floor(0.7 * (N - 1)) = 301 of them reach the threshold.
    assert int((en_scores >= en_threshold).sum()) == 301
    assert int((zh_scores >= zh_threshold).sum()) == 201

    assert {r["reason"] for r in rejects} == {"low_clip_score"}
    assert {r["stage"] for r in rejects} == {"clip"}
    record = next(r for r in records if r["clip_score_en"] < en_threshold and r["clip_score_zh"] is None)
    detail = next(r["detail"] for r in rejects if r["key"] == record["key"])
    assert detail == (
        f"en score {record['clip_score_en']:.4f} < threshold {en_threshold:.4f} (top 30.0% of en scores)"
    )
    assert all("clip_models" not in r for r in kept.values())


def test_absolute_threshold_per_language(tmp_path):
    records = scored_records(count_en=50, count_zh=30, seed=1)
    thresholds = ClipThresholds(min_score={"en": 0.2, "zh": 0.1})
    kept, rejects = run_filter(records, thresholds, tmp_path)

    expected = {
        r["key"]
        for r in records
        if r["clip_score_en"] >= 0.2 and (r["clip_score_zh"] is None or r["clip_score_zh"] >= 0.1)
    }
    assert set(kept) == expected
    assert len(rejects) == 50 - len(expected)


def test_no_thresholds_keep_everything(tmp_path):
    records = scored_records(count_en=20, count_zh=20)
    kept, rejects = run_filter(records, ClipThresholds(), tmp_path)
    assert len(kept) == 20
    assert rejects == []


def test_threshold_from_quantiles_matches_numpy():
    values = sorted(np.random.default_rng(3).uniform(size=1001).tolist())
    for fraction in (0.01, 0.3, 0.5, 0.999, 1.0):
        # 1001 values as 1001 quantiles: quantile j is the j-th smallest value.
        assert threshold_from_quantiles(values, fraction) == np.quantile(values, 1 - fraction, method="lower")
    with pytest.raises(ValueError, match="no quantiles"):
        threshold_from_quantiles([], 0.3)


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"clip_score_en": 0.25, "clip_score_zh": 0.3}, None),  # equal to the threshold passes
        ({"clip_score_en": 0.2499, "clip_score_zh": 0.3}, "en score 0.2499 < threshold 0.2500 (rule en)"),
        ({"clip_score_en": 0.1, "clip_score_zh": 0.05},
         "zh score 0.0500 < threshold 0.2000 (rule zh); en score 0.1000 < threshold 0.2500 (rule en)"),
        ({"clip_score_en": None, "clip_score_zh": 0.3}, None),  # no English caption
        ({"clip_score_en": math.nan}, "en score nan < threshold 0.2500 (rule en)"),
    ],
)
def test_check_scores(record, expected):
    result = check_scores(record, {"en": 0.25, "zh": 0.2}, {"en": "rule en", "zh": "rule zh"})
    if expected is None:
        assert result is None
    else:
        assert result == ("low_clip_score", expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_score": {"en": 0.2}, "top_fraction": {"en": 0.3}}, "either a minimum score or a top fraction"),
        ({"top_fraction": {"en": 0.0}}, "must be in \\(0, 1\\]"),
        ({"top_fraction": {"zh": 1.5}}, "must be in \\(0, 1\\]"),
        ({"min_score": {"en": 2.0}}, "cosine in \\[-1, 1\\]"),
        ({"min_score": {"de": 0.2}}, "unknown caption language 'de'"),
    ],
)
def test_invalid_thresholds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipThresholds(**kwargs)


def parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_curate_arguments(parser)
    return config_from_args(parser.parse_args(argv), ["in.parquet"], "out")


def test_cli_off_by_default():
    assert stage_config_from_curate(parse([])) is None


def test_cli_one_model_top_fraction():
    stage = stage_config_from_curate(
        parse(["--clip-model", "bm6b-tiny", "--clip-top-fraction", "0.3", "--clip-min-score-zh", "0.1",
               "--clip-batch-size", "16", "--clip-min-batch-size", "4", "--clip-keep-embeddings"])
    )
    spec = ClipModelSpec("bm6b-tiny", None, "cpu", "fp32")
    assert stage.models == {"zh": spec, "en": spec}
    assert stage.groups() == [(spec, ("zh", "en"))]
    assert stage.thresholds == ClipThresholds(min_score={"zh": 0.1}, top_fraction={"en": 0.3})
    assert (stage.min_batch_size, stage.max_batch_size, stage.keep_embeddings) == (4, 16, True)


def test_cli_model_per_language(tmp_path):
    import torch

    from bm6b.models.loading import load_clip

    checkpoint = tmp_path / "en.pt"
    torch.save({"model": load_clip("bm6b-tiny")[0].state_dict()}, checkpoint)
    stage = stage_config_from_curate(
        parse(["--clip-model", "bm6b-tiny", "--clip-checkpoint-en", str(checkpoint), "--clip-min-score", "0.2"])
    )
    assert stage.models["zh"] == ClipModelSpec("bm6b-tiny")
    assert stage.models["en"] == ClipModelSpec("bm6b-tiny", str(checkpoint))
    assert stage.thresholds.min_score == {"zh": 0.2, "en": 0.2}


def test_cli_only_one_language():
    stage = stage_config_from_curate(parse(["--clip-model-en", "bm6b-tiny"]))
    assert list(stage.models) == ["en"]


def test_cli_errors_before_the_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file"):
        stage_config_from_curate(parse(["--clip-model", "bm6b-tiny", "--clip-checkpoint", str(tmp_path / "no.pt")]))
    with pytest.raises(ValueError, match="unknown open_clip model config"):
        stage_config_from_curate(parse(["--clip-model", "ViT-Nope"]))
    with pytest.raises(ValueError, match="no model scores that language"):
        stage_config_from_curate(parse(["--clip-model-en", "bm6b-tiny", "--clip-min-score-zh", "0.1"]))

"""End to end on real data: curate Flickr8k from 127.0.0.1, train on CPU, evaluate zh and en retrieval.

The photos and captions are research-use data read from ../shared/data/raw; the shards live in a
temporary folder. Minutes of CPU time, so marked slow; the fast tests in test_train_run.py cover
the same claims on synthetic shards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bm6b.train.evaluate import evaluate, load_for_eval
from bm6b.train.trainer import METRICS_NAME, TrainConfig, load_checkpoint, read_metrics, train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

TEST_IMAGES = 125
CHANCE_R5 = 100 * 5 / TEST_IMAGES  # 4 %


@pytest.fixture(scope="module")
def shards(shared_raw, tmp_path_factory):
    from train_flickr8k import curate_split

    work = tmp_path_factory.mktemp("flickr8k-train")
    return {
        "work": work,
        "train": curate_split(shared_raw, "train", work),
        "test": curate_split(shared_raw, "test", work),
    }


@pytest.fixture(scope="module")
def tokenizer_path(shards):
    from bm6b.train.data import read_samples
    from bm6b.train.tokenizer import train_bilingual_tokenizer

    captions = [
        sample[f"{lang}.txt"].decode("utf-8")
        for sample in read_samples(shards["train"])
        for lang in ("zh", "en")
        if sample.get(f"{lang}.txt")
    ]
    path = shards["work"] / "tokenizer.json"
    train_bilingual_tokenizer(captions, vocab_size=4000, output=path)
    return path


def test_curated_splits(shards):
    from bm6b.train.data import read_samples

    test_samples = list(read_samples(shards["test"]))
    assert len(test_samples) == TEST_IMAGES
    assert all(s.get("zh.txt") and s.get("en.txt") for s in test_samples)
    assert sum(1 for _ in read_samples(shards["train"])) > 700


def test_trained_beats_chance_and_untrained(shards, tokenizer_path):
    import torch

    torch.set_num_threads(2)
    output = shards["work"] / "run"
    config = TrainConfig(
        shards=shards["train"], output=str(output), tokenizer=str(tokenizer_path), context_length=32,
        batch_size=64, steps=400, warmup=40, lr=1e-3, weight_decay=0.1, workers=1, log_every=10,
        save_every=200, progress=False,
    )
    train(config)
    model, preprocess, tokenizer = load_for_eval(str(output / "last.pt"), "bm6b-tiny", "simple", "cpu")
    trained = evaluate(model, preprocess, tokenizer, shards["test"])
    model, preprocess, tokenizer = load_for_eval(None, "bm6b-tiny", str(tokenizer_path), "cpu")
    untrained = evaluate(model, preprocess, tokenizer, shards["test"])
    for lang in ("zh", "en"):
        assert trained[lang]["images"] == TEST_IMAGES
        for direction in ("image_to_text", "text_to_image"):
            recall = trained[lang][direction]["R@5"]
            assert recall >= 2.5 * CHANCE_R5, (lang, direction, recall)
            assert recall > untrained[lang][direction]["R@5"], (lang, direction)


def test_real_data_kill_and_resume(shards, tokenizer_path, tmp_path):
    steps = 20
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def command(output):
        return [
            sys.executable, "-m", "bm6b.train", "--shards", *shards["train"], "--output", str(output),
            "--tokenizer", str(tokenizer_path), "--context-length", "32", "--batch-size", "32",
            "--steps", str(steps), "--save-every", "5", "--log-every", "1", "--warmup", "4",
            "--workers", "1", "--no-progress",
        ]

    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    expected = read_metrics(tmp_path / "whole" / METRICS_NAME)

    output = tmp_path / "killed"
    process = subprocess.Popen(command(output), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        path = output / METRICS_NAME
        if path.is_file() and max(read_metrics(path), default=0) >= 11:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(read_metrics(output / METRICS_NAME)) < steps
    assert load_checkpoint(output / "last.pt")["step"] >= 10

    subprocess.run(command(output), check=True, env=env, capture_output=True)
    actual = read_metrics(output / METRICS_NAME)
    assert sorted(actual) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert actual[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-6), step

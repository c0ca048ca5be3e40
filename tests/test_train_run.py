"""The trainer on synthetic shape shards: learning, kill-and-resume, torchrun with gloo, eval and CLI."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bm6b.cli import main as bm6b_main
from bm6b.train.evaluate import _recalls, evaluate, load_for_eval
from bm6b.train.shardwriter import write_synthetic_shards
from bm6b.train.trainer import METRICS_NAME, TrainConfig, WarmupCosine, load_checkpoint, read_metrics, train

REPO = Path(__file__).resolve().parent.parent
TRAIN_ARGS = ["--batch-size", "16", "--warmup", "3", "--log-every", "1", "--workers", "1", "--no-progress", "--lr", "1e-3"]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    train_shards = write_synthetic_shards(root / "train", 480, seed=0, samples_per_shard=160)
    test_shards = write_synthetic_shards(root / "test", 60, seed=1, samples_per_shard=60)
    return {"root": root, "train": f"{root}/train/{{00000..00002}}.tar", "test": test_shards, "train_list": train_shards}


@pytest.fixture(scope="module")
def trained(data):
    output = data["root"] / "run"
    torch.set_num_threads(1)
    config = TrainConfig(
        shards=[data["train"]], output=str(output), batch_size=32, steps=60, warmup=5, lr=1e-3,
        log_every=5, save_every=30, workers=0, progress=False,
    )
    train(config)
    return output


def test_training_lowers_loss(trained):
    metrics = read_metrics(trained / METRICS_NAME)
    assert sorted(metrics) == list(range(5, 61, 5))
    assert metrics[60]["loss"] < 0.6 * metrics[5]["loss"]
    for record in metrics.values():
        assert {"loss", "lr", "logit_scale", "samples_per_s", "grad_norm"} <= set(record)
        assert record["logit_scale"] <= 100.0


def test_checkpoint_has_full_state(trained):
    state = load_checkpoint(trained / "last.pt")
    assert state["step"] == 60
    assert state["scheduler"]["step_count"] == 60
    assert state["optimizer"]["state"]  # AdamW moments
    assert state["data"][0]["positions"]
    assert {"torch", "python", "numpy_keys"} <= set(state["rng"][0])


def test_checkpoint_loading_rejects_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": io.StringIO("code")}, path)
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(path)


def test_trained_model_beats_untrained(trained, data):
    model, preprocess, tokenizer = load_for_eval(str(trained / "last.pt"), "bm6b-tiny", "simple", "cpu")
    after = evaluate(model, preprocess, tokenizer, data["test"])
    model, preprocess, tokenizer = load_for_eval(None, "bm6b-tiny", "simple", "cpu")
    before = evaluate(model, preprocess, tokenizer, data["test"])
    chance_at_5 = 100 * 5 / 60
    for lang in ("zh", "en"):
        for direction in ("image_to_text", "text_to_image"):
            assert after[lang][direction]["R@5"] > 2 * chance_at_5
            assert after[lang][direction]["R@5"] > before[lang][direction]["R@5"] + 10


def test_recalls_by_hand():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    # Query 0 wants column 0 (rank 1); query 1 wants column 0 (rank 3); query 2 wants 1 or 2 (rank 2).
    recalls = _recalls(similarity, [{0}, {0}, {1, 2}])
    assert recalls["R@1"] == pytest.approx(100 / 3)
    assert recalls["R@5"] == pytest.approx(100.0)


def test_eval_groups_captions_by_image(tmp_path):
    from bm6b.train.shardwriter import make_record, synthetic_pairs, write_shards

    pairs = list(synthetic_pairs(4, seed=2))
    records = []
    for row in range(8):  # every image stored twice, with different captions
        jpeg, zh, en = pairs[row % 4]
        records.append(make_record("dup", row, jpeg, zh + str(row), en + str(row)))
    shards = write_shards(records, tmp_path)
    model, preprocess, tokenizer = load_for_eval(None, "bm6b-tiny", "simple", "cpu")
    result = evaluate(model, preprocess, tokenizer, shards)
    assert result["images"] == 4
    assert result["zh"]["captions"] == 8
    # With 4 candidate images every caption finds its image in the top 5, and with 8 candidate
    # captions every image finds one of its two in the top 10.
    assert result["en"]["text_to_image"]["R@5"] == 100.0
    assert result["en"]["image_to_text"]["R@10"] == 100.0
    assert result["en"]["images"] == 4


def test_warmup_cosine_values():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    schedule = WarmupCosine(optimizer, lr=1.0, warmup=4, total=14, min_lr=0.0)
    assert [round(schedule.value(s), 6) for s in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.5, 0.0]


def _train_command(output, shards, steps, extra=()):
    return [sys.executable, "-m", "bm6b.train", "--shards", shards, "--output", str(output), "--steps", str(steps),
            "--save-every", "4", *TRAIN_ARGS, *extra]


def test_kill_and_resume_continues_loss_curve(data, tmp_path):
    steps = 24
    reference = tmp_path / "uninterrupted"
    subprocess.run(_train_command(reference, data["train"], steps), check=True, env=child_env(), capture_output=True)
    expected = read_metrics(reference / METRICS_NAME)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_train_command(interrupted, data["train"], steps), env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_path = interrupted / METRICS_NAME
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics_path.is_file() and max(read_metrics(metrics_path), default=0) >= 9:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before_kill = max(read_metrics(metrics_path))
    assert 9 <= before_kill < steps, "the run must be killed mid-way"
    assert load_checkpoint(interrupted / "last.pt")["step"] >= 8

    resumed = subprocess.run(_train_command(interrupted, data["train"], steps), env=child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    actual = read_metrics(metrics_path)
    assert sorted(actual) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert actual[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-6), step
        assert actual[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-12)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("group_size,accum", [(1, 2), (0, 1)])
def test_torchrun_gloo_two_ranks(data, tmp_path, group_size, accum):
    output = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "bm6b.train", "--shards", data["train"], "--output", str(output), "--steps", "6",
        "--save-every", "6", "--itc-group-size", str(group_size), "--accum", str(accum), "--device", "cpu",
        *TRAIN_ARGS,
    ]
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected_group = 1 if group_size == 1 else 2
    assert f"world 2, ITC group {expected_group}, micro-batch 16, accumulation {accum}" in result.stderr
    state = load_checkpoint(output / "last.pt")
    assert state["world_size"] == 2
    assert len(state["data"]) == 2
    assert len(state["rng"]) == 2
    metrics = read_metrics(output / METRICS_NAME)
    assert sorted(metrics) == list(range(1, 7))
    assert metrics[6]["samples_per_s"] > 0


def test_cli_tokenizer_train_and_eval(data, trained, tmp_path, capsys):
    tokenizer_path = tmp_path / "tok.json"
    assert bm6b_main(["tokenizer", "train", "--shards", *data["train_list"], "--output", str(tokenizer_path), "--vocab-size", "400"]) == 0
    assert tokenizer_path.is_file()
    results_path = tmp_path / "eval.json"
    assert bm6b_main(["eval", "--shards", data["test"][0], "--checkpoint", str(trained / "last.pt"), "--output", str(results_path)]) == 0
    printed = capsys.readouterr().out
    assert "zh image_to_text" in printed
    assert "en text_to_image" in printed
    assert results_path.is_file()


def test_cli_eval_requires_checkpoint_or_untrained(data):
    with pytest.raises(SystemExit, match="--untrained"):
        bm6b_main(["eval", "--shards", data["test"][0]])


def test_group_size_must_divide_world(tmp_path):
    import torch.distributed as dist

    from bm6b.train.loss import new_itc_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="must be a positive divisor"):
            new_itc_group(2)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast and NCCL paths)")
def test_gpu_bf16_training_step(data, tmp_path):
    config = TrainConfig(shards=[data["train"]], output=str(tmp_path / "gpu"), batch_size=32, steps=5, warmup=1,
                         log_every=1, save_every=5, workers=0, progress=False, device="cuda", precision="bf16")
    record = train(config)
    assert record["step"] == 5
    assert torch.isfinite(torch.tensor(record["loss"]))

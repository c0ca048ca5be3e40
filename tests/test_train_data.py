"""Shard reading for training: text views, corrupt input, deterministic and resumable batch order."""

from __future__ import annotations

import io
import random
import tarfile

import pytest
import torch
from torchvision import transforms

from bm6b.train.data import (
    PositionTracker,
    ShardBatches,
    SlotPosition,
    expand_shards,
    iter_tar_samples,
    text_views,
)
from bm6b.train.shardwriter import write_synthetic_shards
from bm6b.train.tokenizer import load_tokenizer

TO_TENSOR = transforms.Compose([transforms.RandomResizedCrop(32, scale=(0.5, 1.0)), transforms.ToTensor()])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), 90, seed=5, samples_per_shard=30)


def make_stream(shards, **options):
    defaults = dict(batch_size=8, image_transform=TO_TENSOR, tokenizer=load_tokenizer("simple"), seed=3, shuffle_buffer=16)
    defaults.update(options)
    return ShardBatches(shards, **defaults)


def take(stream, count):
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def test_expand_brace_pattern(shards):
    folder = shards[0].rsplit("/", 1)[0]
    assert expand_shards(f"{folder}/{{00000..00002}}.tar") == shards


def test_expand_missing_shard_raises(shards):
    folder = shards[0].rsplit("/", 1)[0]
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_shards(f"{folder}/{{00000..00005}}.tar")


def test_tar_samples_group_members(shards):
    samples = list(iter_tar_samples(shards[0]))
    assert len(samples) == 30
    assert {"jpg", "zh.txt", "en.txt", "json"} <= set(samples[0])
    assert len(samples[0]["__key__"]) == 16


def test_truncated_tar_keeps_earlier_samples(shards, tmp_path, caplog):
    data = open(shards[0], "rb").read()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[: len(data) // 2])
    samples = list(iter_tar_samples(str(broken)))
    assert 5 < len(samples) < 30
    assert "corrupt or truncated" in caplog.text


@pytest.mark.parametrize(
    "policy,expected",
    [("zh", [("zh", "中文")]), ("en", [("en", "english")]), ("both", [("zh", "中文"), ("en", "english")])],
)
def test_text_views_policies(policy, expected):
    sample = {"zh.txt": "中文".encode(), "en.txt": b"english"}
    assert text_views(sample, policy, random.Random(0)) == expected


def test_text_views_random_picks_available():
    rng = random.Random(0)
    picks = {text_views({"zh.txt": "中文".encode(), "en.txt": b"english"}, "random", rng)[0][0] for _ in range(50)}
    assert picks == {"zh", "en"}
    assert text_views({"en.txt": b"only english"}, "zh", rng) == []
    assert text_views({"en.txt": b"only english"}, "random", rng) == [("en", "only english")]


def test_unknown_policy_raises(shards):
    with pytest.raises(ValueError, match="unknown text policy"):
        make_stream(shards, policy="fr")


def test_order_is_deterministic(shards):
    first = take(make_stream(shards), 6)
    second = take(make_stream(shards), 6)
    for a, b in zip(first, second):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"])


def test_epochs_differ_in_order(shards):
    batches = take(make_stream(shards, policy="en"), 22)  # 90 views per epoch, 11 batches of 8
    assert batches[10]["epoch"] == 0
    assert batches[11]["epoch"] == 1
    epoch0 = [k for b in batches[:11] for k in b["keys"]]
    epoch1 = [k for b in batches[11:] for k in b["keys"]]
    assert len(set(epoch0)) == 88  # the last 2 views of the epoch do not fill a batch
    assert epoch0 != epoch1


def test_resume_replays_same_batches(shards):
    uninterrupted = take(make_stream(shards), 20)
    tracker = PositionTracker(num_workers=0)
    for batch in uninterrupted[:13]:
        tracker.update(batch)
    positions = PositionTracker.load_positions(tracker.state_dict(), num_workers=0)
    resumed = take(make_stream(shards, positions=positions), 7)
    for a, b in zip(uninterrupted[13:], resumed):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"])  # augmentation replays too
        assert torch.equal(a["texts"], b["texts"])


def test_ranks_read_disjoint_samples(shards):
    keys = [set(k for b in take(make_stream(shards, rank=r, world_size=3, policy="en", batch_size=5), 6) for k in b["keys"])
            for r in range(3)]
    assert not keys[0] & keys[1]
    assert not keys[0] & keys[2]
    assert not keys[1] & keys[2]


def test_fewer_shards_than_slots_splits_samples(shards):
    keys = [set(k for b in take(make_stream(shards[:1], rank=r, world_size=2, policy="en", batch_size=5), 3) for k in b["keys"])
            for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 15
    assert not keys[0] & keys[1]


def test_too_little_data_raises(shards):
    with pytest.raises(RuntimeError, match="no full batch"):
        take(make_stream(shards[:1], batch_size=64), 1)


def test_bad_image_is_skipped(tmp_path, caplog):
    path = tmp_path / "00000.tar"
    good = write_synthetic_shards(tmp_path / "good", 3, seed=1)[0]
    with tarfile.open(good) as source, tarfile.open(path, "w") as target:
        for index, member in enumerate(source.getmembers()):
            payload = source.extractfile(member).read()
            if index == 0:
                payload = b"<html>not a jpeg</html>"
                member.size = len(payload)
            target.addfile(member, io.BytesIO(payload))
    batch = take(make_stream([str(path)], batch_size=2, policy="en"), 1)[0]
    assert len(batch["keys"]) == 2
    assert "bad image" in caplog.text


def test_worker_count_mismatch_raises():
    state = PositionTracker(2, {0: SlotPosition(1, 5)}).state_dict()
    with pytest.raises(ValueError, match="--workers 2"):
        PositionTracker.load_positions(state, num_workers=1)

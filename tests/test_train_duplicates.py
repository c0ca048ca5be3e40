"""Duplicate-image masking in the ITC loss: values by hand, GradCache, two gloo ranks, image ids in batches."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bm6b.train.data import ShardBatches, image_id
from bm6b.train.loss import GroupedClipLoss, clip_loss, grouped_clip_loss_reference, new_itc_group
from bm6b.train.shardwriter import write_synthetic_shards
from bm6b.train.step import contrastive_step
from bm6b.train.tokenizer import load_tokenizer

WORLD = 2
ROWS = 4  # pairs per rank
# Image ids of the 2 x 4 rows: rank 0 computes rows 0-3 and rank 1 rows 4-7. Id 7 occurs on both
# ranks and id 3 twice on rank 0, so the mask acts inside a rank and across the gather.
IDS = torch.tensor([7, 3, 5, 3, 7, 11, 12, 13])


def features(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(rows, 5, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(rows, 5, generator=generator, dtype=torch.float64), dim=-1)
    return image, text


def masked_loss_by_hand(image, text, scale, ids) -> float:
    """Symmetric InfoNCE where each row's softmax skips the other columns with its image id."""
    logits = (scale * image @ text.T).tolist()
    rows = len(logits)
    total = 0.0
    for direction in ("image_to_text", "text_to_image"):
        for i in range(rows):
            row = logits[i] if direction == "image_to_text" else [logits[j][i] for j in range(rows)]
            unmasked = [row[j] for j in range(rows) if j == i or ids[j] != ids[i]]
            total += -row[i] + math.log(sum(math.exp(value) for value in unmasked))
    return total / (2 * rows)


def test_masked_loss_by_hand():
    image, text = features(4, seed=1)
    scale = torch.tensor(9.0, dtype=torch.float64)
    ids = IDS[:4]
    expected = masked_loss_by_hand(image, text, scale, ids.tolist())
    assert GroupedClipLoss()(image, text, scale, ids).item() == pytest.approx(expected, rel=1e-12)
    assert clip_loss(image, text, scale, ids).item() == pytest.approx(expected, rel=1e-12)


def test_mask_changes_loss_only_with_duplicates():
    image, text = features(4, seed=2)
    scale = torch.tensor(9.0, dtype=torch.float64)
    unique = torch.tensor([1, 2, 3, 4])
    plain = clip_loss(image, text, scale).item()
    assert GroupedClipLoss()(image, text, scale, unique).item() == pytest.approx(plain, rel=1e-14)
    # Masking removes terms from each denominator, so the loss can only fall.
    assert GroupedClipLoss()(image, text, scale, IDS[:4]).item() < plain


def test_sample_ids_shape_is_checked():
    image, text = features(4, seed=3)
    with pytest.raises(ValueError, match="one entry per feature row"):
        GroupedClipLoss()(image, text, torch.tensor(1.0), torch.tensor([1, 2, 3]))


class ToyClip(nn.Module):
    """Linear towers with a learned logit scale; open_clip's output_dict interface."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(6, 5, dtype=torch.float64)
        self.text_proj = nn.Linear(4, 5, dtype=torch.float64)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))

    def forward(self, images, texts):
        return {
            "image_features": F.normalize(self.image_proj(images), dim=-1),
            "text_features": F.normalize(self.text_proj(texts), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def toy_inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(42)
    return (
        torch.randn(rows, 6, generator=generator, dtype=torch.float64),
        torch.randn(rows, 4, generator=generator, dtype=torch.float64),
    )


def test_grad_cache_masks_across_micro_batches():
    images, texts = toy_inputs(8)
    whole = ToyClip()
    contrastive_step(whole, [(images, texts)], GroupedClipLoss(), sample_ids=[IDS])
    split = ToyClip()
    micro_batches = [(images[:4], texts[:4]), (images[4:], texts[4:])]
    result = contrastive_step(split, micro_batches, GroupedClipLoss(), sample_ids=[IDS[:4], IDS[4:]])

    expected = ToyClip()
    out = expected(images, texts)
    loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"], IDS)
    loss.backward()
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for (name, actual), reference in zip(split.named_parameters(), expected.parameters()):
        torch.testing.assert_close(actual.grad, reference.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, actual), reference in zip(whole.named_parameters(), expected.parameters()):
        torch.testing.assert_close(actual.grad, reference.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_sample_ids_per_micro_batch_are_checked():
    images, texts = toy_inputs(8)
    with pytest.raises(ValueError, match="2 sample id tensors for 1 micro-batches"):
        contrastive_step(ToyClip(), [(images, texts)], GroupedClipLoss(), sample_ids=[IDS[:4], IDS[4:]])


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    image, text = features(WORLD * ROWS, seed=5)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    loss = GroupedClipLoss(new_itc_group(WORLD))(
        image[rows], text[rows], torch.tensor(8.0, dtype=torch.float64), IDS[rows]
    )
    dist.all_reduce(loss)
    torch.save(loss / WORLD, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_mask_gathered_duplicates(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    image, text = features(WORLD * ROWS, seed=5)
    scale = torch.tensor(8.0, dtype=torch.float64)
    expected = grouped_clip_loss_reference(image, text, scale, 1, IDS).item()
    assert expected == pytest.approx(masked_loss_by_hand(image, text, scale, IDS.tolist()), rel=1e-12)
    for rank in range(WORLD):
        actual = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True).item()
        assert actual == pytest.approx(expected, rel=1e-12)


def test_image_id_follows_record_sha256():
    digest = "ab" * 32
    first = {"__key__": "k1", "json": json.dumps({"sha256": digest}).encode()}
    second = {"__key__": "k2", "json": json.dumps({"sha256": digest}).encode()}
    assert image_id(first) == int(digest[:15], 16)
    assert image_id(second) == image_id(first)


def test_image_id_without_record_uses_key():
    assert image_id({"__key__": "k1"}) != image_id({"__key__": "k2"})
    assert image_id({"__key__": "k1", "json": b"not json"}) == image_id({"__key__": "k1"})
    assert 0 <= image_id({"__key__": "k1"}) < 2**63


def test_batches_carry_image_ids(tmp_path):
    shards = write_synthetic_shards(tmp_path, 16, seed=5, samples_per_shard=16)
    stream = ShardBatches(
        shards, batch_size=8, image_transform=lambda image: torch.zeros(3, 8, 8),
        tokenizer=load_tokenizer("simple"), policy="both",
    )
    batch = next(iter(stream))
    assert batch["image_ids"].dtype == torch.int64
    assert batch["image_ids"].shape == (8,)
    # "both" gives the zh and en views of one sample, which share its image.
    by_key = dict(zip(batch["keys"], batch["image_ids"].tolist()))
    for key, identity in zip(batch["keys"], batch["image_ids"].tolist()):
        assert by_key[key] == identity
    assert len(set(batch["keys"])) < len(batch["keys"])

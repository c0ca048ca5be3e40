"""Grouped ITC loss (GBA) on W = 4 real gloo processes, against single-process float64 references.

One spawn runs every case; each rank saves its loss and DDP-averaged gradients, and the tests
compare them with a reference computed here on the concatenated batch. Tolerances (float64):
relative 1e-12 on the loss, absolute 1e-12 plus relative 1e-10 on gradients.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bm6b.train.loss import GroupedClipLoss, clip_loss, grouped_clip_loss_reference, new_itc_group
from bm6b.train.step import contrastive_step

WORLD = 4
BATCH = 3  # pairs per rank per micro-batch
IMAGE_IN, TEXT_IN, EMBED = 12, 10, 6
# (group size k, micro-batches m)
CASES = [(4, 1), (2, 1), (1, 1), (2, 2), (4, 2)]
LOSS_RTOL = 1e-12
GRAD_RTOL, GRAD_ATOL = 1e-10, 1e-12


class ToyClip(nn.Module):
    """Linear image and text towers with a learned logit scale; open_clip's output_dict interface."""

    def __init__(self):
        super().__init__()
        self.image_proj = nn.Linear(IMAGE_IN, EMBED)
        self.text_proj = nn.Linear(TEXT_IN, EMBED)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, texts):
        return {
            "image_features": F.normalize(self.image_proj(images), dim=-1),
            "text_features": F.normalize(self.text_proj(texts), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def make_model() -> ToyClip:
    torch.manual_seed(0)
    return ToyClip().double()


def make_inputs(micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return image and text inputs shaped (rank, micro-batch, row, feature)."""
    generator = torch.Generator().manual_seed(1234 + micro_batches)
    images = torch.randn(WORLD, micro_batches, BATCH, IMAGE_IN, generator=generator, dtype=torch.float64)
    texts = torch.randn(WORLD, micro_batches, BATCH, TEXT_IN, generator=generator, dtype=torch.float64)
    return images, texts


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD
    )
    results = {}
    for group_size, micro in CASES:
        itc_group = new_itc_group(group_size)
        model = nn.parallel.DistributedDataParallel(make_model())
        images, texts = make_inputs(micro)
        batches = [(images[rank, t], texts[rank, t]) for t in range(micro)]
        step = contrastive_step(model, batches, GroupedClipLoss(itc_group))
        mean_loss = step.loss.clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        results[(group_size, micro)] = {
            "loss": mean_loss,
            "grads": {name: p.grad.clone() for name, p in model.module.named_parameters()},
        }

    # open_clip's exact local loss on the same features, as an independent value for k = W.
    from open_clip.loss import ClipLoss

    model = make_model()
    images, texts = make_inputs(1)
    with torch.no_grad():
        out = model(images[rank, 0], texts[rank, 0])
        reference = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
        open_clip_loss = reference(out["image_features"], out["text_features"], out["logit_scale"])
        dist.all_reduce(open_clip_loss)
    results["open_clip"] = open_clip_loss / WORLD

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gba")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def reference(group_size: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the mean over groups of the CLIP loss on each group's m*k*b samples, and its gradients."""
    model = make_model()
    images, texts = make_inputs(micro)
    # Rows ordered group by group: ranks of a group are consecutive, micro-batches inside a rank.
    flat_images = images.reshape(WORLD * micro * BATCH, IMAGE_IN)
    flat_texts = texts.reshape(WORLD * micro * BATCH, TEXT_IN)
    out = model(flat_images, flat_texts)
    loss = grouped_clip_loss_reference(
        out["image_features"], out["text_features"], out["logit_scale"], num_groups=WORLD // group_size
    )
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(actual: dict, expected: dict, names=None) -> None:
    for name in names or expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


@pytest.mark.parametrize("group_size,micro", CASES)
def test_loss_matches_reference(rank_results, group_size, micro):
    expected, _ = reference(group_size, micro)
    for rank in range(WORLD):
        actual = rank_results[rank][(group_size, micro)]["loss"]
        assert abs(actual.item() - expected.item()) <= LOSS_RTOL * abs(expected.item())


@pytest.mark.parametrize("group_size,micro", CASES)
def test_ddp_grads_match_reference(rank_results, group_size, micro):
    _, expected = reference(group_size, micro)
    tower_params = [name for name in expected if name != "logit_scale"]
    for rank in range(WORLD):
        assert_grads_close(rank_results[rank][(group_size, micro)]["grads"], expected, tower_params)


@pytest.mark.parametrize("group_size,micro", CASES)
def test_logit_scale_grad_matches_reference(rank_results, group_size, micro):
    _, expected = reference(group_size, micro)
    assert expected["logit_scale"].abs().item() > 1e-6  # a zero gradient would pass trivially
    for rank in range(WORLD):
        assert_grads_close(rank_results[rank][(group_size, micro)]["grads"], expected, ["logit_scale"])


def test_global_group_equals_open_clip(rank_results):
    expected, _ = reference(WORLD, 1)
    for rank in range(WORLD):
        assert abs(rank_results[rank]["open_clip"].item() - expected.item()) <= LOSS_RTOL * expected.item()
        assert abs(rank_results[rank][(WORLD, 1)]["loss"].item() - rank_results[rank]["open_clip"].item()) <= (
            LOSS_RTOL * expected.item()
        )


def test_grouping_changes_loss(rank_results):
    # Groups see fewer negatives, so the grouped loss must differ from the global one.
    global_loss = rank_results[0][(WORLD, 1)]["loss"].item()
    grouped_loss = rank_results[0][(2, 1)]["loss"].item()
    assert abs(global_loss - grouped_loss) > 1e-3


def test_grouped_reference_is_mean_of_blocks():
    torch.manual_seed(3)
    image = F.normalize(torch.randn(8, 4, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(8, 4, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    by_hand = (clip_loss(image[:4], text[:4], scale) + clip_loss(image[4:], text[4:], scale)) / 2
    assert grouped_clip_loss_reference(image, text, scale, 2).item() == pytest.approx(by_hand.item(), rel=1e-14)
    assert grouped_clip_loss_reference(image, text, scale, 1).item() == pytest.approx(
        clip_loss(image, text, scale).item(), rel=1e-14
    )


def test_single_process_loss_is_clip_loss():
    torch.manual_seed(4)
    image = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    scale = torch.tensor(7.0, dtype=torch.float64)
    logits = scale * image @ text.T
    # Symmetric InfoNCE by hand: -log softmax of the diagonal, rows and columns.
    by_hand = -0.5 * (logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean())
    assert GroupedClipLoss()(image, text, scale).item() == pytest.approx(by_hand.item(), rel=1e-14)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        GroupedClipLoss()(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(1.0))

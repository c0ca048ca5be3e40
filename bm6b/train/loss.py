"""Contrastive image-text (ITC) losses for data-parallel training, including grouped aggregation.

Notation: W ranks, b pairs per rank per micro-batch, d embedding dim, k ranks per ITC group
(k divides W), m micro-batches per optimizer step.

``GroupedClipLoss`` is the grouped-aggregation ITC loss (GBA-ITC, after M2-Encoder, Guo et al.
2024, arXiv 2401.15896, whose training code is unpublished). Ranks are split into groups of k
consecutive ranks. Each rank all-gathers features only inside its group and computes the
symmetric InfoNCE loss of its own rows against the group's columns (the "local loss" form), so
its logits take b x k*b memory. The gather's backward is a reduce-scatter, so gradients reach the
rank that produced each feature. Averaged over all ranks, the loss equals the mean over groups of
the standard CLIP loss on each group's samples. With k = W it is the exact global CLIP loss, the
same as open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``.

Batch accumulation over m micro-batches (GradCache) lives in ``bm6b.train.step``: this module's
loss then sees each rank's m*b cached rows and the group's m*k*b columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# open_clip's convention: the learned logit scale is exp(p) with p clamped to [0, log(100)].
MAX_LOGIT_SCALE = 100.0
MAX_LOG_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 inside ``group``; the backward reduce-scatters (SUM) the gradient.

    Written out instead of ``torch.distributed.nn.all_gather`` because that function's backward
    uses all-to-all on non-NCCL backends, which older gloo builds reject. Both collectives here
    (``all_gather_into_tensor``, ``reduce_scatter_tensor``) work on gloo and NCCL in torch 2.14.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, group_size: int) -> torch.Tensor:
        ctx.group = group
        ctx.group_size = group_size
        tensor = tensor.contiguous()
        output = tensor.new_empty((group_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(output, tensor, group=group)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_output = grad_output.contiguous()
        rows = grad_output.shape[0] // ctx.group_size
        grad_input = grad_output.new_empty((rows, *grad_output.shape[1:]))
        dist.reduce_scatter_tensor(grad_input, grad_output, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_input, None, None


def gather_with_grad(tensor: torch.Tensor, group=None, group_size: int | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank of ``group`` in rank order, keeping the gradient path."""
    if group_size is None:
        group_size = dist.get_world_size(group) if dist.is_initialized() else 1
    if group_size == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, group, group_size)


def gather_ids(ids: torch.Tensor, group=None, group_size: int = 1) -> torch.Tensor:
    """Concatenate the int64 image ids of every rank of ``group`` in rank order (no gradient)."""
    if group_size == 1:
        return ids
    output = ids.new_empty((group_size * ids.shape[0],))
    dist.all_gather_into_tensor(output, ids.contiguous(), group=group)
    return output


def mask_duplicates(logits: torch.Tensor, row_ids: torch.Tensor, column_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits whose column has the row's image id but is not the row's own pair.

    Two pairs that share an image (the same photo with another caption, or its other language)
    are not negatives of each other. Masking drops them from the softmax denominator, so each
    row's target stays its own pair and the loss neither pulls nor pushes the duplicate.
    """
    duplicate = row_ids[:, None] == column_ids[None, :]
    duplicate[torch.arange(logits.shape[0], device=logits.device), labels] = False
    return logits.masked_fill(duplicate, float("-inf"))


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the symmetric InfoNCE (CLIP) loss of N aligned pairs in one process: row i matches column i.

    With ``sample_ids`` (one int64 image id per pair), pairs that share an id are not negatives
    of each other (see ``mask_duplicates``).
    """
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    logits_per_text = logits.T
    if sample_ids is not None:
        logits = mask_duplicates(logits, sample_ids, sample_ids, labels)
        logits_per_text = mask_duplicates(logits_per_text, sample_ids, sample_ids, labels)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits_per_text, labels))


def grouped_clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    num_groups: int,
    sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the mean over ``num_groups`` equal consecutive blocks of the CLIP loss of each block.

    This is what ``GroupedClipLoss`` computes across all ranks when the rows are ordered group by
    group; single-process, for tests and benchmarks.
    """
    if image_features.shape[0] % num_groups:
        raise ValueError(f"{image_features.shape[0]} rows do not split into {num_groups} equal groups")
    id_chunks = sample_ids.chunk(num_groups) if sample_ids is not None else [None] * num_groups
    losses = [
        clip_loss(img, txt, logit_scale, ids)
        for img, txt, ids in zip(image_features.chunk(num_groups), text_features.chunk(num_groups), id_chunks)
    ]
    return torch.stack(losses).mean()


@dataclass(frozen=True)
class ItcGroup:
    """This rank's ITC process group: the group handle, this rank's index in it, and its size k."""

    group: object
    group_rank: int
    group_size: int
    world_size: int

    @property
    def num_groups(self) -> int:
        return self.world_size // self.group_size


def new_itc_group(group_size: int | None = None) -> ItcGroup:
    """Split the world into groups of ``group_size`` consecutive ranks and return this rank's group.

    Every rank must call this, with the same ``group_size``, because ``new_group`` is collective
    over the whole world. ``None`` or the world size gives one group of all ranks (the exact global
    loss); without an initialized process group the result is a group of one.
    """
    if not dist.is_initialized():
        return ItcGroup(group=None, group_rank=0, group_size=1, world_size=1)
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    if group_size is None or group_size == world_size:
        return ItcGroup(group=dist.group.WORLD, group_rank=rank, group_size=world_size, world_size=world_size)
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"ITC group size {group_size} must be a positive divisor of the world size {world_size}")
    mine = None
    for start in range(0, world_size, group_size):
        handle = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = handle
    return ItcGroup(group=mine, group_rank=rank % group_size, group_size=group_size, world_size=world_size)


class GroupedClipLoss(nn.Module):
    """Grouped-aggregation ITC loss (GBA-ITC) in local-loss form.

    ``forward(image_features, text_features, logit_scale)`` takes this rank's n rows (b, or m*b
    with accumulation), L2-normalized, and returns this rank's loss: the mean over its rows of the
    image-to-text and text-to-image cross-entropies against the k*n columns of its group. Averaging
    the returned value over all W ranks (which DDP does to the parameter gradients) gives the mean
    over groups of the CLIP loss on each group's k*n samples. The optional ``sample_ids`` (int64,
    one image id per row) mask pairs of the group that share this row's image (``mask_duplicates``).
    """

    def __init__(self, itc_group: ItcGroup | None = None):
        super().__init__()
        self.itc_group = itc_group or ItcGroup(group=None, group_rank=0, group_size=1, world_size=1)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image features {tuple(image_features.shape)} and text features "
                f"{tuple(text_features.shape)} must have the same shape"
            )
        if sample_ids is not None and sample_ids.shape != image_features.shape[:1]:
            raise ValueError(
                f"sample ids {tuple(sample_ids.shape)} must have one entry per feature row ({image_features.shape[0]})"
            )
        group = self.itc_group
        rows = image_features.shape[0]
        all_image = gather_with_grad(image_features, group.group, group.group_size)
        all_text = gather_with_grad(text_features, group.group, group.group_size)
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(rows, device=image_features.device) + group.group_rank * rows
        if sample_ids is not None:
            all_ids = gather_ids(sample_ids, group.group, group.group_size)
            logits_per_image = mask_duplicates(logits_per_image, sample_ids, all_ids, labels)
            logits_per_text = mask_duplicates(logits_per_text, sample_ids, all_ids, labels)
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))

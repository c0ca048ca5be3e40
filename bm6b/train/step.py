"""One optimizer step's forward and backward with the grouped ITC loss and batch accumulation.

The model is any module (DDP-wrapped or not) whose ``forward(images, texts)`` returns a dict with
L2-normalized ``image_features``, ``text_features`` and the ``logit_scale`` (open_clip models
created with ``output_dict=True`` do).

With one micro-batch the step is a plain forward, grouped loss and backward. With m > 1
micro-batches it is GradCache (Gao et al. 2021, arXiv 2101.06983):

1. encode every micro-batch without gradient;
2. compute the grouped loss over all m micro-batches' features (the group gathers them), and
   back-propagate to the cached features and the logit scale only;
3. re-encode each micro-batch with gradient and back-propagate the cached feature gradients,
   under ``no_sync`` except the last micro-batch, so DDP all-reduces parameter gradients once.

Each sample then sees m*k*b - 1 negatives and features never leave the ITC group.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from bm6b.train.loss import GroupedClipLoss

MicroBatch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's loss, detached
    logit_scale: torch.Tensor  # detached exp(logit scale) used in the step


def _encode(model: nn.Module, images: torch.Tensor, texts: torch.Tensor):
    out = model(images, texts)
    return out["image_features"], out["text_features"], out["logit_scale"]


def _no_sync(model: nn.Module, skip_sync: bool):
    if skip_sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _rng_states(device: torch.device) -> tuple:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _set_rng_states(states: tuple, device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def _loss(loss_fn, image_features, text_features, logit_scale, ids):
    # Loss modules without duplicate masking (benchmark wrappers, open_clip's losses) take three arguments.
    if ids is None:
        return loss_fn(image_features, text_features, logit_scale)
    return loss_fn(image_features, text_features, logit_scale, sample_ids=ids)


def contrastive_step(
    model: nn.Module,
    micro_batches: Sequence[MicroBatch],
    loss_fn: GroupedClipLoss,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    sample_ids: Sequence[torch.Tensor] | None = None,
) -> StepResult:
    """Run forward and backward for one optimizer step, accumulating gradients in ``.grad``.

    ``autocast`` returns the mixed-precision context for the encoders. The loss always runs in
    float32 or higher (features are cast up). ``sample_ids``, one int64 tensor of image ids per
    micro-batch, lets the loss mask pairs that share an image.
    """
    if not micro_batches:
        raise ValueError("contrastive_step needs at least one micro-batch")
    if sample_ids is not None and len(sample_ids) != len(micro_batches):
        raise ValueError(f"got {len(sample_ids)} sample id tensors for {len(micro_batches)} micro-batches")
    ids = torch.cat(list(sample_ids)) if sample_ids is not None else None

    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with autocast():
            image_features, text_features, logit_scale = _encode(model, images, texts)
        dtype = torch.promote_types(image_features.dtype, torch.float32)
        loss = _loss(loss_fn, image_features.to(dtype), text_features.to(dtype), logit_scale.to(dtype), ids)
        loss.backward()
        return StepResult(loss=loss.detach(), logit_scale=logit_scale.detach())

    return _grad_cache_step(model, micro_batches, loss_fn, autocast, ids)


def _grad_cache_step(model, micro_batches, loss_fn, autocast, ids) -> StepResult:
    device = micro_batches[0][0].device

    # 1. Encode without gradient, remembering the RNG state so the re-encode draws the same dropout masks.
    rng_states = []
    image_cache, text_cache = [], []
    with torch.no_grad():
        for images, texts in micro_batches:
            rng_states.append(_rng_states(device))
            with autocast():
                image_features, text_features, logit_scale = _encode(model, images, texts)
            image_cache.append(image_features)
            text_cache.append(text_features)
    dtype = torch.promote_types(image_cache[0].dtype, torch.float32)

    # 2. Grouped loss over all cached rows. Gradients stop at the cached features and the scale.
    image_leaf = torch.cat(image_cache).to(dtype).requires_grad_()
    text_leaf = torch.cat(text_cache).to(dtype).requires_grad_()
    scale_leaf = logit_scale.detach().to(dtype).requires_grad_()
    loss = _loss(loss_fn, image_leaf, text_leaf, scale_leaf, ids)
    loss.backward()
    sizes = [len(images) for images, _ in micro_batches]
    image_grads = image_leaf.grad.split(sizes)
    text_grads = text_leaf.grad.split(sizes)

    # 3. Re-encode with gradient and inject the cached gradients. The scale's gradient enters once.
    last = len(micro_batches) - 1
    for t, (images, texts) in enumerate(micro_batches):
        _set_rng_states(rng_states[t], device)
        with _no_sync(model, skip_sync=t < last):
            with autocast():
                image_features, text_features, logit_scale_t = _encode(model, images, texts)
            surrogate = (image_features.to(dtype) * image_grads[t]).sum()
            surrogate = surrogate + (text_features.to(dtype) * text_grads[t]).sum()
            scale_grad = scale_leaf.grad if t == last else torch.zeros_like(scale_leaf.grad)
            surrogate = surrogate + (logit_scale_t.to(dtype) * scale_grad).sum()
            surrogate.backward()
    return StepResult(loss=loss.detach(), logit_scale=scale_leaf.detach())

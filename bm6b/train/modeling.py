"""Building open_clip models for training and evaluation, sized to the chosen tokenizer."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bm6b.models import register_model_configs, weights_loaded_later


def build_model(
    model_name: str,
    tokenizer,
    device: torch.device | str = "cpu",
    crop_scale_min: float = 0.9,
    weights_follow: bool = False,
):
    """Create a randomly initialized open_clip model; return (model, train transform, eval transform).

    The text tower's vocabulary and context length follow the tokenizer. No pretrained weights
    are loaded, so nothing is downloaded. ``crop_scale_min`` is the smallest image area fraction
    of the training random-resized crop (open_clip's default is 0.9).
    """
    import open_clip

    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model config {model_name!r}; see open_clip.list_models()")
    text_cfg = dict(config["text_cfg"])
    text_cfg["vocab_size"] = tokenizer.vocab_size
    text_cfg["context_length"] = tokenizer.context_length
    # weights_follow: the caller loads a checkpoint next, so open_clip's random-init warning is wrong.
    quiet = weights_loaded_later() if weights_follow else contextlib.nullcontext()
    with quiet:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name,
            pretrained=None,
            device=device,
            output_dict=True,
            text_cfg=text_cfg,
            aug_cfg={"scale": (crop_scale_min, 1.0)},
        )
    return model, preprocess_train, preprocess_val


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model

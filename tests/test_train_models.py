"""The model configs bundled for training build at the tokenizer's sizes and encode 64 px images."""

from __future__ import annotations

import pytest
import torch

from bm6b.train.modeling import build_model
from bm6b.train.tokenizer import load_tokenizer


@pytest.mark.parametrize("name,embed_dim", [("bm6b-tiny", 64), ("bm6b-small-resnet", 128)])
def test_bundled_config_encodes(name, embed_dim):
    tokenizer = load_tokenizer("simple", context_length=32)
    torch.manual_seed(0)
    model, preprocess_train, preprocess_eval = build_model(name, tokenizer, crop_scale_min=0.5)
    model.eval()
    with torch.no_grad():
        images = torch.randn(2, 3, 64, 64)
        texts = tokenizer(["一只狗在草地上跑", "a dog runs on the grass"])
        out = model(images, texts)
    assert out["image_features"].shape == (2, embed_dim)
    assert out["text_features"].shape == (2, embed_dim)
    assert model.context_length == 32

"""open_clip's random-init warning is dropped only where bm6b loads weights right after."""

from __future__ import annotations

import logging

import open_clip
import torch

from bm6b.models import TINY_MODEL, register_model_configs, weights_loaded_later
from bm6b.models.loading import load_clip, load_transforms

RANDOM_INIT = "No pretrained weights loaded for model"


def random_init_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(RANDOM_INIT)]


def test_open_clip_still_warns_on_random_init(caplog):
    # Guards the filter below against a silent change of open_clip's message.
    register_model_configs()
    with caplog.at_level(logging.WARNING):
        open_clip.create_model(TINY_MODEL, load_weights=False)
    assert random_init_warnings(caplog) == [f"{RANDOM_INIT} '{TINY_MODEL}'. Model initialized randomly."]


def test_weights_loaded_later_drops_only_that_warning(caplog):
    register_model_configs()
    with caplog.at_level(logging.WARNING), weights_loaded_later():
        open_clip.create_model(TINY_MODEL, load_weights=False)
        logging.warning("another root warning")
    assert random_init_warnings(caplog) == []
    assert [r.getMessage() for r in caplog.records] == ["another root warning"]


def test_filter_is_removed_after_the_block(caplog):
    register_model_configs()
    with weights_loaded_later():
        pass
    with caplog.at_level(logging.WARNING):
        open_clip.create_model(TINY_MODEL, load_weights=False)
    assert len(random_init_warnings(caplog)) == 1


def test_load_clip_checkpoint_skips_warning(tmp_path, caplog):
    register_model_configs()
    state_dict = open_clip.create_model(TINY_MODEL, load_weights=False).state_dict()
    path = tmp_path / "weights.pt"
    torch.save(state_dict, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_clip(TINY_MODEL, str(path))
    assert random_init_warnings(caplog) == []

    with caplog.at_level(logging.WARNING):
        load_clip(TINY_MODEL)  # no checkpoint: the model really is random
    assert len(random_init_warnings(caplog)) == 1


def test_transforms_alone_do_not_warn(caplog):
    # curate builds the transforms on the meta device and the scoring model separately. Only the
    # scoring model is random, so a run without weights warns once, not twice.
    register_model_configs()
    with caplog.at_level(logging.WARNING):
        load_transforms(TINY_MODEL)
    assert random_init_warnings(caplog) == []
    with caplog.at_level(logging.WARNING):
        load_clip(TINY_MODEL)
    assert len(random_init_warnings(caplog)) == 1

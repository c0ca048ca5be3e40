"""open_clip model configs that ship with bm6b, and model loading shared by scoring and training."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"

# A 2-layer, 64-wide, 64 px CLIP for tests and demos: random init, about 10k images/s on one CPU core.
TINY_MODEL = "bm6b-tiny"

_registered = False


def register_model_configs() -> None:
    """Add bm6b's bundled configs (``bm6b-tiny``, ...) to open_clip's model registry, once."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    _registered = True


class _RandomInitWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def weights_loaded_later():
    """Drop open_clip's "No pretrained weights loaded" warning while a model is created.

    open_clip 3.3 logs it on the root logger for every model built without a pretrained tag, which
    misleads when bm6b loads a checkpoint into the model right after.
    """
    root = logging.getLogger()
    warning_filter = _RandomInitWarningFilter()
    root.addFilter(warning_filter)
    try:
        yield
    finally:
        root.removeFilter(warning_filter)

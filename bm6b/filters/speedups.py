"""Compiled versions of the per-caption rules, and the switch that turns them off.

``setup.py`` builds ``_translate_fast`` and ``_caption_fast`` from ``.pyx`` files with Cython when
a C compiler is present. Each gives the same results as the pure-Python rules it replaces, which
stay the reference: the tests compare both on real captions. Set ``BM6B_PURE_PYTHON=1`` to run the
pure-Python rules, for example to compare the two on your own data.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

logger = logging.getLogger(__name__)

COMPILED_MODULES = ("_translate_fast", "_caption_fast")


def pure_python() -> bool:
    return os.environ.get("BM6B_PURE_PYTHON", "") not in ("", "0")


def compiled(name: str) -> ModuleType | None:
    """Return the compiled module ``bm6b.filters.<name>``, or None when it is switched off or not built."""
    if pure_python():
        return None
    try:
        return importlib.import_module(f"bm6b.filters.{name}")
    except ImportError as err:
        logger.warning("bm6b.filters.%s is not built (%s); the caption rules run as pure Python, "
                       "about three times slower. Reinstall bm6b where a C compiler is present.", name, err)
        return None

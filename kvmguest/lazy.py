"""numpy, imported when first used: its import is ~100 ms, most of what `kvmguest run`
of a small guest would otherwise cost; booting a guest needs no numpy."""

from __future__ import annotations

import importlib.util
import sys


def lazy_numpy():
    """The numpy module, executed on first attribute access (importlib's LazyLoader)."""
    module = sys.modules.get("numpy")
    if module is not None:
        return module
    spec = importlib.util.find_spec("numpy")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["numpy"] = module
    loader.exec_module(module)
    return module

"""Imports of the optional extras, failing with the pip command that installs them."""
from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> the top-level modules it brings (setup.cfg's [options.extras_require] lists the packages)
EXTRAS = {
    "plots": ("matplotlib",),
    "research": ("scipy", "sklearn"),
    "data": ("sklearn", "PIL", "webdataset", "pandas"),
}


def require(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or ImportError naming ``pip install open_clip_sigrel[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed; it comes with the '{extra}' extra: pip install 'open_clip_sigrel[{extra}]'"
        ) from e

"""Imports of the optional extras, failing with the pip command that installs them."""
from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> the modules the package imports from it through ``require`` (setup.cfg's [options.extras_require]
#: lists their distributions; a unit test checks the two agree). Pillow is not one: torchvision brings it.
EXTRAS = {
    "train": ("webdataset", "pandas", "braceexpand"),
    "plots": ("matplotlib",),
    "research": ("scipy", "sklearn"),
    "data": ("sklearn", "webdataset", "pandas", "braceexpand"),
    "hf": ("transformers",),
}
#: the distribution of each module above
DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def require(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or ImportError naming ``pip install open_clip_sigrel[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed; it comes with the '{extra}' extra: pip install 'open_clip_sigrel[{extra}]'"
        ) from e

"""open_clip_sigrel: the relative-bias sigmoid loss as a plugin for open_clip.

The public API is what ``__all__`` lists (see ARCHITECTURE.md for the layout). Names are imported on
first use, so ``import open_clip_sigrel`` stays light and does not import open_clip.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # the loss (loss/)
    "sigrel_loss": "open_clip_sigrel.loss",
    "multimodal_sigrel_loss": "open_clip_sigrel.loss",
    "batched_sigrel_loss": "open_clip_sigrel.loss",
    "SigRelLoss": "open_clip_sigrel.loss",
    # the sign convention (bias.py)
    "rel_bias_from_logit_bias": "open_clip_sigrel.bias",
    "logit_bias_from_rel_bias": "open_clip_sigrel.bias",
    # the model extension and its checkpoint conversion (model.py)
    "enable_rel_bias": "open_clip_sigrel.model",
    "has_rel_bias": "open_clip_sigrel.model",
    "sigrel_values": "open_clip_sigrel.model",
    "to_open_clip_state_dict": "open_clip_sigrel.model",
    "from_open_clip_state_dict": "open_clip_sigrel.model",
    # the model-config block (configs/)
    "SigrelConfig": "open_clip_sigrel.configs",
    "add_model_config": "open_clip_sigrel.configs",
    # geometry metrics (metrics/)
    "geometry_metrics": "open_clip_sigrel.metrics",
    "GeometryMetric": "open_clip_sigrel.metrics",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'open_clip_sigrel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

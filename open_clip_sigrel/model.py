"""The model side of sigrel: a trainable relative bias that stock open_clip can still load.

open_clip builds its optimizer, DDP wrapper and checkpoints from ``model.named_parameters()``
before the loss exists, so b_rel must live on the model. ``enable_rel_bias`` turns an open_clip
CLIP / CustomTextCLIP into one whose parameters are ``logit_scale`` (log t, as before) and
``rel_bias`` (b_rel), and whose ``logit_bias`` is the derived value ``-t * b_rel``:

* every open_clip code path that reads ``model.logit_bias`` (forward, get_logits, the loss call)
  sees the effective bias, and autograd carries its gradient to ``rel_bias`` and ``logit_scale``;
* ``state_dict()`` writes ``logit_bias = -t * b_rel`` in place of ``rel_bias``, so a checkpoint has
  exactly the keys of a stock SigLIP-style model and loads strictly without this package;
* ``load_state_dict`` accepts such a checkpoint back (b_rel = -logit_bias / t).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class _RelBiasMixin:
    """Placed in front of the model's own class: ``logit_bias`` becomes derived."""

    @property
    def logit_bias(self) -> torch.Tensor:
        return -self.logit_scale.exp() * self.rel_bias

    @property
    def sigrel_values(self) -> dict[str, float]:
        """t, b_rel and the effective logit_bias as Python floats (for logs)."""
        with torch.no_grad():
            t = float(self.logit_scale.detach().float().exp().mean())
            b = float(self.rel_bias.detach().float().mean())
        return {"logit_scale": t, "rel_bias": b, "logit_bias": -t * b}


_CLASS_CACHE: dict[type, type] = {}


def _rel_bias_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"RelBias{cls.__name__}", (_RelBiasMixin, cls), {"__module__": __name__})
    return _CLASS_CACHE[cls]


def has_rel_bias(model: nn.Module) -> bool:
    return isinstance(model, _RelBiasMixin)


def _state_dict_post_hook(module, state_dict, prefix, local_metadata):
    rel = state_dict.pop(prefix + "rel_bias")
    scale = state_dict[prefix + "logit_scale"]
    state_dict[prefix + "logit_bias"] = (-scale.exp() * rel).detach()


def _load_state_dict_pre_hook(module, state_dict, prefix, *args):
    # A stock / sigrel checkpoint carries logit_bias = -t * b_rel; recover b_rel with the
    # checkpoint's own t so the pair (t, b_rel) comes back exactly (to float rounding).
    bias_key, rel_key, scale_key = prefix + "logit_bias", prefix + "rel_bias", prefix + "logit_scale"
    if bias_key in state_dict and rel_key not in state_dict and scale_key in state_dict:
        bias = state_dict.pop(bias_key)
        scale = state_dict[scale_key].reshape(bias.shape) if bias.numel() == 1 else state_dict[scale_key]
        rel = -bias / scale.exp()
        state_dict[rel_key] = rel.reshape(module.rel_bias.shape).to(module.rel_bias.dtype)


def enable_rel_bias(
    model: nn.Module,
    rel_bias: float | None = None,
    *,
    logit_scale: float | None = None,
    fixed_rel_bias: bool = False,
    fixed_logit_scale: bool = False,
) -> nn.Module:
    """Give an open_clip model a trainable relative bias, in place; returns the model.

    Args:
        rel_bias: initial b_rel. None keeps the model's current effective bias
            (-logit_bias / t: e.g. a loaded SigLIP checkpoint), or 1.0 if it has none.
        logit_scale: initial t (not log t). None keeps the model's current t.
        fixed_rel_bias / fixed_logit_scale: freeze b_rel / t (the paper's "fixed relative bias" mode).
    """
    if has_rel_bias(model):
        raise ValueError("model already has a relative bias (enable_rel_bias was applied twice)")
    if not isinstance(getattr(model, "logit_scale", None), nn.Parameter):
        raise ValueError(f"{type(model).__name__} has no logit_scale parameter: not an open_clip contrastive model")
    scale = model.logit_scale
    with torch.no_grad():
        if logit_scale is not None:
            _check_finite_positive("logit_scale (t)", logit_scale)
            scale.fill_(math.log(logit_scale))
        t = scale.detach().exp()
        current = getattr(model, "logit_bias", None)
        if rel_bias is not None:
            _check_finite("rel_bias", rel_bias)
            init = torch.full_like(scale, float(rel_bias))
        elif isinstance(current, torch.Tensor):
            init = (-current.detach() / t).reshape(scale.shape).to(scale.dtype)
        else:
            init = torch.ones_like(scale)
        if not torch.isfinite(init).all() or not torch.isfinite(t).all():
            raise ValueError(f"non-finite initial t={t.tolist()} or b_rel={init.tolist()}")
    if "logit_bias" in model._parameters:
        del model._parameters["logit_bias"]
    elif "logit_bias" in model.__dict__:
        del model.__dict__["logit_bias"]
    model.__class__ = _rel_bias_class(type(model))
    model.register_parameter("rel_bias", nn.Parameter(init, requires_grad=not fixed_rel_bias))
    scale.requires_grad_(not fixed_logit_scale)
    model.register_state_dict_post_hook(_state_dict_post_hook)
    model.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    return model


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")


def _check_finite_positive(name: str, value: float) -> None:
    _check_finite(name, value)
    if float(value) <= 0:
        raise ValueError(f"{name} must be > 0 (it is exp(logit_scale)), got {value}")

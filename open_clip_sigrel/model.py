"""The model side of sigrel: a trainable relative bias on an open_clip model that stock open_clip can still load.

open_clip builds its optimizer, DDP / FSDP2 wrapper and checkpoints from ``model.named_parameters()``
before the loss exists, so b_rel must live on the model. ``enable_rel_bias`` gives an open_clip CLIP /
CustomTextCLIP, in place and without changing its class, the parameters ``logit_scale`` (log t, as
before) and ``rel_bias`` (b_rel); ``logit_bias`` becomes the derived value ``-t * b_rel``:

* a forward pre-hook sets ``model.logit_bias`` (a non-persistent buffer) to ``-t * b_rel`` computed from
  the parameters, so open_clip's forward (3.x and 4.x, dict or tuple output, and the 4.x tasks that read
  the model's output) returns the effective bias and autograd carries its gradient to ``rel_bias`` and
  ``logit_scale``. The forward hook leaves a detached copy behind, so outside a forward
  ``model.logit_bias`` is the value of the last forward; ``logit_bias(model)`` computes it now.
* ``state_dict()`` holds ``logit_bias = -t * b_rel`` in place of ``rel_bias`` (``to_open_clip_state_dict``),
  so a checkpoint has exactly the keys of a stock SigLIP-style model and loads strictly without this
  package; ``load_state_dict`` takes such a checkpoint back (``from_open_clip_state_dict``).

Every hook is a module-level function, so a sigrel model pickles (``pickle``, ``torch.save(model)``),
deep-copies, and keeps its hooks through FSDP2's ``fully_shard`` (which swaps the class to ``FSDP<cls>``
and re-registers 0-d parameters as [1]: the hooks look the parameters up by name at each call).
The two state-dict conversions are pure functions, like timm's ``checkpoint_filter_fn``:

>>> sd = {"logit_scale": torch.tensor(math.log(10.0)), "rel_bias": torch.tensor(0.5)}
>>> round(to_open_clip_state_dict(sd)["logit_bias"].item(), 4)
-5.0
>>> round(from_open_clip_state_dict(to_open_clip_state_dict(sd))["rel_bias"].item(), 4)
0.5
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from open_clip_sigrel.bias import logit_bias_from_rel_bias, rel_bias_from_logit_bias

LOGIT_SCALE, LOGIT_BIAS, REL_BIAS = "logit_scale", "logit_bias", "rel_bias"


# -- state dicts (pure functions)

def to_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str | None = None
                            ) -> dict[str, torch.Tensor]:
    """A sigrel state dict as stock open_clip's: ``<prefix>rel_bias`` becomes ``<prefix>logit_bias = -t * b_rel``.

    Returns a new dict in the same key order (the input is left as it is). ``prefix`` None converts every
    prefix that has a ``rel_bias`` key (``""``, DDP's ``"module."``, ...); a given prefix converts that one.
    Raises ValueError when there is no rel_bias, when t (``logit_scale``) is missing beside it, or when a
    ``logit_bias`` is already there. The value keeps rel_bias's dtype and shape.
    """
    return _convert(state_dict, prefix, REL_BIAS, LOGIT_BIAS, _logit_bias_of)


def from_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str | None = None
                              ) -> dict[str, torch.Tensor]:
    """The inverse of ``to_open_clip_state_dict``: ``<prefix>logit_bias`` becomes ``<prefix>rel_bias = -logit_bias / t``.

    A stock SigLIP-style checkpoint gives the b_rel of its own t. Same prefixes, order and errors as
    ``to_open_clip_state_dict``.
    """
    return _convert(state_dict, prefix, LOGIT_BIAS, REL_BIAS, _rel_bias_of)


def _logit_bias_of(rel: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(rel.dtype, scale.dtype), torch.float32)
    out = logit_bias_from_rel_bias(rel.to(dtype), scale.to(dtype).exp())
    return _like(out, rel)


def _rel_bias_of(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(bias.dtype, scale.dtype), torch.float32)
    out = rel_bias_from_logit_bias(bias.to(dtype), scale.to(dtype).exp())
    return _like(out, bias)


def _like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    value = value.to(ref.dtype)
    return value if value.shape == ref.shape else value.reshape(ref.shape)  # 0-d t beside a [1] bias (FSDP2)


def _convert(state_dict, prefix, src: str, dst: str, fn) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    if prefix is None:
        prefixes = {k[: -len(src)] for k in state_dict if k == src or k.endswith("." + src)}
        if not prefixes:
            hint = " (a checkpoint? pass checkpoint['state_dict'])" if "state_dict" in state_dict else ""
            raise ValueError(f"no '{src}' key in the state dict{hint}; keys start with {sorted(state_dict)[:5]}")
    else:
        if prefix + src not in state_dict:
            raise ValueError(f"no '{prefix}{src}' key in the state dict")
        prefixes = {prefix}
    for p in sorted(prefixes):
        if p + LOGIT_SCALE not in state_dict:
            raise ValueError(f"'{p}{src}' has no '{p}{LOGIT_SCALE}' beside it: t is needed "
                             "(logit_bias = -t * b_rel, t = exp(logit_scale))")
        if p + dst in state_dict:
            raise ValueError(f"the state dict holds both '{p}{src}' and '{p}{dst}': which one is the bias is ambiguous")
    out = {}
    for key, value in state_dict.items():
        p = key[: -len(src)]
        if key.endswith(src) and p in prefixes:
            out[p + dst] = fn(value, state_dict[p + LOGIT_SCALE])
        else:
            out[key] = value
    return out


# -- the model extension

def has_rel_bias(model: nn.Module) -> bool:
    """Whether ``enable_rel_bias`` was applied to this module (not to a wrapper around it)."""
    return (isinstance(model, nn.Module) and REL_BIAS in model._parameters
            and any(h is _set_logit_bias for h in model._forward_pre_hooks.values()))


def logit_bias(model: nn.Module) -> torch.Tensor:
    """The effective bias -t * b_rel of a sigrel model, from its parameters now (with autograd)."""
    return logit_bias_from_rel_bias(model.rel_bias, model.logit_scale.exp())


def sigrel_values(model: nn.Module) -> dict[str, float]:
    """t, b_rel and the effective logit_bias of a sigrel model as Python floats (for logs)."""
    with torch.no_grad():
        t = float(model.logit_scale.detach().float().exp().mean())
        b = float(model.rel_bias.detach().float().mean())
    return {"logit_scale": t, "rel_bias": b, "logit_bias": logit_bias_from_rel_bias(b, t)}


def _set_logit_bias(module: nn.Module, args) -> None:
    # FSDP2's pre-forward hook is prepended, so the parameters are unsharded here and the bias is part of
    # the forward that its backward hooks cover.
    module._buffers[LOGIT_BIAS] = logit_bias(module)


def _detach_logit_bias(module: nn.Module, args, output) -> None:
    # A graph left on the module would keep the step's graph alive and make deepcopy / pickle fail.
    bias = module._buffers.get(LOGIT_BIAS)
    if bias is not None:
        module._buffers[LOGIT_BIAS] = bias.detach()


def _state_dict_post_hook(module, state_dict, prefix, local_metadata) -> None:
    keys = (prefix + LOGIT_SCALE, prefix + REL_BIAS)
    converted = to_open_clip_state_dict({k: state_dict[k] for k in keys}, prefix=prefix)
    del state_dict[prefix + REL_BIAS]
    state_dict[prefix + LOGIT_BIAS] = converted[prefix + LOGIT_BIAS].detach()


def _load_state_dict_pre_hook(module, state_dict, prefix, *args) -> None:
    # A stock / sigrel checkpoint carries logit_bias = -t * b_rel; b_rel comes back with the checkpoint's
    # own t, so the pair (t, b_rel) round-trips (to float rounding). A state dict that lacks t, or holds a
    # rel_bias of its own, is left to load_state_dict's key checks. DCP's set_model_state_dict (FSDP2, full
    # state dicts) puts the module's current rel_bias beside the checkpoint's logit_bias: the checkpoint wins.
    bias_key, rel_key, scale_key = prefix + LOGIT_BIAS, prefix + REL_BIAS, prefix + LOGIT_SCALE
    own = module._parameters[REL_BIAS]
    if bias_key not in state_dict or scale_key not in state_dict:
        return
    if rel_key in state_dict and state_dict[rel_key] is not own:
        return
    bias, scale = state_dict[bias_key], state_dict[scale_key]
    if _is_dtensor(bias) != _is_dtensor(scale):  # a whole checkpoint bias beside DCP's sharded t
        bias, scale = _full(bias), _full(scale)
    rel = from_open_clip_state_dict({bias_key: bias, scale_key: scale}, prefix=prefix)[rel_key]
    rel = _like(rel, own)
    if _is_dtensor(own) and not _is_dtensor(rel):  # shard it as FSDP2 shards the parameter
        from torch.distributed.tensor import distribute_tensor

        rel = distribute_tensor(rel.to(own.device), own.device_mesh, own.placements)
    del state_dict[bias_key]
    state_dict[rel_key] = rel


def _is_dtensor(x) -> bool:
    return hasattr(x, "device_mesh") and hasattr(x, "full_tensor")


def _full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if _is_dtensor(x) else x  # a collective: every rank loads at the same time


def _load_state_dict_post_hook(module, incompatible_keys) -> None:
    # Outside a forward, model.logit_bias shows the loaded value. FSDP2's sharded parameters are left to
    # the next forward (a DTensor buffer would be a new kind of state for FSDP2 to handle).
    if any(_is_dtensor(p) for p in (module.rel_bias, module.logit_scale)):
        return
    with torch.no_grad():
        module._buffers[LOGIT_BIAS] = logit_bias(module).detach()


def enable_rel_bias(
    model: nn.Module,
    rel_bias: float | None = None,
    *,
    logit_scale: float | None = None,
    fixed_rel_bias: bool = False,
    fixed_logit_scale: bool = False,
) -> nn.Module:
    """Give an open_clip model a trainable relative bias, in place (its class stays); returns the model.

    Args:
        rel_bias: initial b_rel. None keeps the model's current effective bias
            (-logit_bias / t: e.g. a loaded SigLIP checkpoint), or 1.0 if it has none.
        logit_scale: initial t (not log t). None keeps the model's current t.
        fixed_rel_bias / fixed_logit_scale: freeze b_rel / t (the paper's "fixed relative bias" mode).
    """
    if has_rel_bias(model):
        raise ValueError("model already has a relative bias (enable_rel_bias was applied twice)")
    if not isinstance(getattr(model, LOGIT_SCALE, None), nn.Parameter):
        raise ValueError(f"{type(model).__name__} has no logit_scale parameter: not an open_clip contrastive model")
    if REL_BIAS in model._parameters or REL_BIAS in model._buffers or REL_BIAS in model.__dict__:
        raise ValueError(f"{type(model).__name__} already has an attribute 'rel_bias'")
    scale = model.logit_scale
    with torch.no_grad():
        if logit_scale is not None:
            _check_finite_positive("logit_scale (t)", logit_scale)
            scale.fill_(math.log(logit_scale))
        t = scale.detach().exp()
        current = getattr(model, LOGIT_BIAS, None)
        if rel_bias is not None:
            _check_finite("rel_bias", rel_bias)
            init = torch.full_like(scale, float(rel_bias))
        elif isinstance(current, torch.Tensor):
            init = rel_bias_from_logit_bias(current.detach(), t).reshape(scale.shape).to(scale.dtype)
        else:
            init = torch.ones_like(scale)
        if not torch.isfinite(init).all() or not torch.isfinite(t).all():
            raise ValueError(f"non-finite initial t={t.tolist()} or b_rel={init.tolist()}")
    if LOGIT_BIAS in model._parameters:
        del model._parameters[LOGIT_BIAS]
    elif LOGIT_BIAS in model.__dict__:  # open_clip sets logit_bias = None when the model has no bias
        del model.__dict__[LOGIT_BIAS]
    model.register_parameter(REL_BIAS, nn.Parameter(init, requires_grad=not fixed_rel_bias))
    scale.requires_grad_(not fixed_logit_scale)
    with torch.no_grad():
        model.register_buffer(LOGIT_BIAS, logit_bias(model).detach(), persistent=False)
    model.register_forward_pre_hook(_set_logit_bias)
    # prepend: runs before FSDP2's post-forward reshard; always_call: no graph is left behind on an error
    model.register_forward_hook(_detach_logit_bias, prepend=True, always_call=True)
    model.register_state_dict_post_hook(_state_dict_post_hook)
    model.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    model.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    return model


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")


def _check_finite_positive(name: str, value: float) -> None:
    _check_finite(name, value)
    if float(value) <= 0:
        raise ValueError(f"{name} must be > 0 (it is exp(logit_scale)), got {value}")

"""Sigrel settings in open_clip model configs, without breaking stock open_clip.

Stock open_clip passes every key of a bare model JSON into the model constructor, so a
"sigrel" key there would be a TypeError. The settings live instead beside ``model_cfg`` in
open_clip's own hub/local-dir config format, whose extra top-level keys stock open_clip ignores:

    {"model_cfg": {...a normal open_clip model config...},
     "preprocess_cfg": {...optional...},
     "sigrel": {"init_t": 10.0, "init_rel_bias": 1.0,
                "fixed_rel_bias": false, "fixed_logit_scale": false, "max_t": 100.0}}

The block is ``SigrelConfig`` (its fields and units are documented there): every scale in it is
t = exp(logit_scale), never log t (model_cfg's own ``init_logit_scale`` is log t). The old names
``init_logit_scale`` / ``max_logit_scale`` (also t) are still read, with a DeprecationWarning.
Shipped configs also set ``init_logit_bias`` in model_cfg, so stock open_clip builds the bias
parameter a sigrel checkpoint carries. Bare configs are accepted too (no sigrel block).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip

SHIPPED_CONFIG_DIR = Path(__file__).parent


@dataclass(frozen=True)
class SigrelConfig:
    """The ``"sigrel"`` block of a model config; command-line flags override it.

    Attributes:
        init_t: initial t = exp(logit_scale) (not log t), > 0. SigLIP's t0 = 10.
        init_rel_bias: initial b_rel (logits = t * (s - b_rel); logit_bias = -t * b_rel). SigLIP's b_rel0 = 1.
        fixed_rel_bias: freeze b_rel and train t (the paper's "fixed relative bias").
        fixed_logit_scale: freeze t.
        max_t: upper clamp of t after each step, >= 1 or inf (no clamp); None keeps open_clip's (t <= 100).
    """

    init_t: float = 10.0
    init_rel_bias: float = 1.0
    fixed_rel_bias: bool = False
    fixed_logit_scale: bool = False
    max_t: float | None = None

    def __post_init__(self):
        for name, value in _validated(dataclasses.asdict(self), "SigrelConfig").items():
            object.__setattr__(self, name, value)  # frozen; ints become floats

    def to_dict(self) -> dict:
        """The block as JSON data (``parse_sigrel_block`` reads it back)."""
        return dataclasses.asdict(self)


# Old key -> new key. Both were t; the new names cannot be read as open_clip's log t.
DEPRECATED_KEYS = {"init_logit_scale": "init_t", "max_logit_scale": "max_t"}

_SIGREL_BLOCKS: dict[str, SigrelConfig] = {}
_bare_dir: Path | None = None
_shipped: list[str] | None = None


def _validated(values: dict, source: str) -> dict:
    """The block's values checked field by field (numbers as floats); ValueError naming the key."""
    out = {}
    for f in dataclasses.fields(SigrelConfig):
        value = values[f.name]
        if f.type in (bool, "bool"):
            if not isinstance(value, bool):
                raise ValueError(f"{source}: sigrel.{f.name} must be true or false, got {value!r}")
        elif not (value is None and f.name == "max_t"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: sigrel.{f.name} must be a number, got {value!r}")
            value = float(value)
            if math.isnan(value) or (math.isinf(value) and f.name != "max_t"):
                raise ValueError(f"{source}: sigrel.{f.name} must be finite, got {value}")
            if f.name == "init_t" and value <= 0:
                raise ValueError(f"{source}: sigrel.init_t is t = exp(logit_scale) and must be > 0, got {value}")
            if f.name == "max_t" and value < 1:
                raise ValueError(f"{source}: sigrel.max_t is t = exp(logit_scale) and must be >= 1 (or inf), "
                                 f"got {value}")
        out[f.name] = value
    return out


def parse_sigrel_block(block: dict, source: str = "config") -> SigrelConfig:
    """A sigrel block (JSON data) as a validated ``SigrelConfig``; keys it leaves out keep their defaults.

    Raises ValueError naming the key for an unknown key, a wrong type, a non-finite value, t <= 0, or an
    old and a new name given together; an old name alone warns (DeprecationWarning) and is read.
    """
    if not isinstance(block, dict):
        raise ValueError(f"{source}: 'sigrel' must be a JSON object, got {type(block).__name__}")
    block = dict(block)
    for old, new in DEPRECATED_KEYS.items():
        if old not in block:
            continue
        if new in block:
            raise ValueError(f"{source}: sigrel.{old} and sigrel.{new} are the same setting (t); give only {new}")
        warnings.warn(f"{source}: sigrel.{old} is deprecated, rename it to {new} (same value: t, not log t)",
                      DeprecationWarning, stacklevel=2)
        block[new] = block.pop(old)
    known = [f.name for f in dataclasses.fields(SigrelConfig)]
    unknown = sorted(set(block) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown sigrel setting(s) {unknown}; known: {known}")
    defaults = SigrelConfig().to_dict()
    return SigrelConfig(**_validated({**defaults, **block}, source))  # the file's name in the messages


def _register_bare(name: str, model_cfg: dict) -> None:
    global _bare_dir
    if _bare_dir is None:
        _bare_dir = Path(tempfile.mkdtemp(prefix="open_clip_sigrel_cfg_"))
        atexit.register(shutil.rmtree, _bare_dir, ignore_errors=True)
    (_bare_dir / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(_bare_dir / f"{name}.json")


def add_model_config(path: str | Path) -> list[str]:
    """Registers a config file (or every *.json in a folder) with open_clip; returns the names.

    Hub-format files register their ``model_cfg`` under the file stem and keep their sigrel block
    for ``get_sigrel_config``; bare files go to open_clip unchanged.
    """
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no model config JSON at {path}")
    names = []
    for f in files:
        try:
            cfg = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        if "model_cfg" in cfg:
            _SIGREL_BLOCKS[f.stem] = parse_sigrel_block(cfg.get("sigrel", {}), str(f))
            _register_bare(f.stem, cfg["model_cfg"])
        elif "sigrel" in cfg:
            raise ValueError(
                f"{f}: a 'sigrel' block next to bare model keys would break stock open_clip; "
                "put the model keys under 'model_cfg' (open_clip's hub config format)"
            )
        else:
            open_clip.add_model_config(f)
        names.append(f.stem)
    return names


def register_shipped_configs() -> list[str]:
    """Registers the configs that ship with the package (once per process)."""
    global _shipped
    if _shipped is None:
        _shipped = add_model_config(SHIPPED_CONFIG_DIR)
    return list(_shipped)


def get_sigrel_config(model_name: str) -> SigrelConfig:
    """The sigrel block registered for ``model_name`` (the defaults if it has none)."""
    return _SIGREL_BLOCKS.get(model_name.replace("/", "-"), SigrelConfig())

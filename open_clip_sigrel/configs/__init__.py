"""Sigrel settings in open_clip model configs, without breaking stock open_clip.

Stock open_clip passes every key of a bare model JSON into the model constructor, so a
"sigrel" key there would be a TypeError. The settings live instead beside ``model_cfg`` in
open_clip's own hub/local-dir config format, whose extra top-level keys stock open_clip ignores:

    {"model_cfg": {...a normal open_clip model config...},
     "preprocess_cfg": {...optional...},
     "sigrel": {"init_logit_scale": 10.0, "init_rel_bias": 1.0,
                "fixed_rel_bias": false, "fixed_logit_scale": false, "max_logit_scale": 100.0}}

``init_logit_scale`` and ``max_logit_scale`` are t (not log t). Shipped configs also set
``init_logit_bias`` in model_cfg, so stock open_clip builds the bias parameter a sigrel checkpoint
carries. Bare configs are accepted too (no sigrel block).
"""
from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
from pathlib import Path

import open_clip

SIGREL_KEYS: dict[str, type] = {
    "init_logit_scale": float,
    "init_rel_bias": float,
    "fixed_rel_bias": bool,
    "fixed_logit_scale": bool,
    "max_logit_scale": float,
}
SHIPPED_CONFIG_DIR = Path(__file__).parent

_SIGREL_BLOCKS: dict[str, dict] = {}
_bare_dir: Path | None = None
_shipped: list[str] | None = None


def parse_sigrel_block(block: dict, source: str = "config") -> dict:
    """Validates a sigrel block: known keys, right types, finite values, t > 0."""
    if not isinstance(block, dict):
        raise ValueError(f"{source}: 'sigrel' must be a JSON object, got {type(block).__name__}")
    unknown = sorted(set(block) - set(SIGREL_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown sigrel setting(s) {unknown}; known: {sorted(SIGREL_KEYS)}")
    out = {}
    for key, value in block.items():
        kind = SIGREL_KEYS[key]
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{source}: sigrel.{key} must be true or false, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: sigrel.{key} must be a number, got {value!r}")
            value = float(value)
            if math.isnan(value) or (math.isinf(value) and key != "max_logit_scale"):
                raise ValueError(f"{source}: sigrel.{key} must be finite, got {value}")
            if key.endswith("logit_scale") and value <= 0:
                raise ValueError(f"{source}: sigrel.{key} is t = exp(logit_scale) and must be > 0, got {value}")
        out[key] = value
    return out


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
    for ``get_sigrel_block``; bare files go to open_clip unchanged.
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


def get_sigrel_block(model_name: str) -> dict:
    """The sigrel settings registered for ``model_name`` ({} if none)."""
    return dict(_SIGREL_BLOCKS.get(model_name.replace("/", "-"), {}))

"""Which host adapter runs, and what works whatever open_clip is installed."""
from __future__ import annotations

import subprocess
import textwrap
import types

import pytest

from open_clip_sigrel import hosts
from open_clip_sigrel._compat import check_open_clip_version
from open_clip_sigrel.hosts import open_clip3, open_clip4


def _fake_main(*names: str) -> types.ModuleType:
    module = types.ModuleType("open_clip_train.main")
    for name in names:
        setattr(module, name, lambda *a, **k: None)
    return module


def test_adapter_is_chosen_by_what_open_clip_train_offers():
    assert hosts.select(_fake_main("create_task", "train_one_epoch", "create_model_and_transforms")) is open_clip4
    assert hosts.select(_fake_main("create_loss", "train_one_epoch", "pt_load",
                                   "create_model_and_transforms")) is open_clip3
    with pytest.raises(ImportError, match=r"neither create_task \(4.x\) nor create_loss .*open_clip_torch>=2.30,<5"):
        hosts.select(_fake_main("train_one_epoch"))


def test_installed_open_clip_gets_its_adapter():
    import open_clip_train.main as oc_main

    expected = open_clip4 if hasattr(oc_main, "create_task") else open_clip3
    assert hosts.select() is expected


@pytest.mark.parametrize("installed,ok", [("2.29.0", False), ("2.30.0", True), ("3.3.0", True),
                                          ("4.2.0.dev0", True), ("5.0.0", False)])
def test_supported_range(installed, ok):
    if ok:
        assert check_open_clip_version(installed) == installed
    else:
        with pytest.raises(ImportError, match=r"supports open_clip_torch>=2.30,<5; found open_clip_torch " + installed):
            check_open_clip_version(installed)


UNSUPPORTED = textwrap.dedent("""
    import importlib.metadata as md
    real = md.version
    md.version = lambda name: "9.0.0" if name == "open_clip_torch" else real(name)
    import torch
    from open_clip_sigrel import SigRelLoss, sigrel_loss
    from open_clip_sigrel.metrics.geometry import geometry_metrics
    from open_clip_sigrel.tools import bounds
    x = torch.nn.functional.normalize(torch.randn(8, 4, dtype=torch.float64), dim=-1)
    assert torch.isfinite(sigrel_loss(x, x, logit_scale=10.0, rel_bias=0.5))
    assert "margin_mean" in geometry_metrics(x, x)
    from open_clip_sigrel.cli.train import main
    main(["--train-data", "x.tar", "--loss", "sigrel"])
""")


def test_library_works_with_any_open_clip_only_the_entry_refuses(python):
    out = subprocess.run([python, "-c", UNSUPPORTED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "open-clip-sigrel-train: error: the training entry supports open_clip_torch>=2.30,<5; " \
           "found open_clip_torch 9.0.0" in out.stderr

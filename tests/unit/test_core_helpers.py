"""The small core modules: the sign convention, the JSONL reader / table, optional extras, training options."""
import argparse
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from open_clip_sigrel import bias, io
from open_clip_sigrel.extras import DISTRIBUTIONS, EXTRAS


def test_sign_convention_round_trips_and_matches_open_clips_logits():
    t, b_rel = torch.tensor(12.5, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    logit_bias = bias.logit_bias_from_rel_bias(b_rel, t)
    s = torch.linspace(-1, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(t * s + logit_bias, t * (s - b_rel))  # open_clip's logits == the paper's
    torch.testing.assert_close(bias.rel_bias_from_logit_bias(logit_bias, t), b_rel)
    assert bias.rel_bias_from_logit_bias(-10.0, 10.0) == 1.0  # SigLIP's init


def test_read_jsonl_strict_and_lenient(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2}) + "\n" + '{"a": 3')  # last line cut short
    with pytest.raises(ValueError, match=r"r.jsonl, line 4: not JSON"):
        io.read_jsonl(path)
    assert io.read_jsonl(path, strict=False) == [{"a": 1}, {"a": 2}]
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        io.read_jsonl(tmp_path / "list.jsonl")
    assert io.read_jsonl(tmp_path / "absent.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        io.read_jsonl(tmp_path / "absent.jsonl")


def test_format_table_aligns_columns():
    out = io.format_table(("name", "x"), [("a", "1.5"), ("long-name", "-2")], title="T").splitlines()
    assert out[0] == "T"
    assert out[1].split() == ["name", "x"] and set(out[2]) == {"-"}
    assert out[3].startswith("a ") and out[3].endswith("1.5") and out[4].endswith(" -2")
    assert len({len(line) for line in out[1:]}) == 1


def test_the_extras_table_matches_the_package_metadata():
    """Each module the code imports through require(module, extra) is a distribution of that extra in setup.cfg."""
    from importlib.metadata import requires

    declared: dict[str, set[str]] = {}
    for req in requires("open_clip_sigrel") or []:
        if "extra ==" in req:
            name = re.split(r"[<>=!~; \[]", req, maxsplit=1)[0].lower()
            declared.setdefault(req.split("extra ==")[1].strip().strip("'\""), set()).add(name)
    for extra, modules in EXTRAS.items():
        for module in modules:
            assert DISTRIBUTIONS.get(module, module).lower() in declared.get(extra, set()), (extra, module)
        assert declared[extra] <= declared["all"] <= declared["test"]


def test_every_require_call_names_an_extra_that_brings_the_module():
    """The call sites themselves (not the table): require(<module>, <extra>) across the package's source."""
    calls = re.findall(r"require\(f?[\"']([\w.{}]+)[\"'], [\"'](\w+)[\"']\)", "\n".join(
        p.read_text() for p in Path(bias.__file__).parent.rglob("*.py")))
    assert len(calls) >= 8
    for module, extra in calls:
        top = module.split(".")[0].replace("{module}", "")
        if top:
            assert top in EXTRAS[extra], (module, extra)


@pytest.mark.parametrize("module, extra, call", [
    ("scipy", "research", lambda: __import__("open_clip_sigrel.tools.bounds", fromlist=["x"]).delsarte_lp_bound(7, 0.3)),
    ("matplotlib", "plots", lambda: __import__("open_clip_sigrel.tools.plots", fromlist=["x"]).plot_training_curves(
        "missing.jsonl", "out.png")),
    ("sklearn", "data", lambda: __import__("open_clip_sigrel.tools.data", fromlist=["x"]).make_digits_dataset(
        "unused_dir", n_train=4, n_val=4)),
])
def test_a_missing_extra_fails_at_its_call_site_naming_the_extra(monkeypatch, tmp_path, module, extra, call):
    monkeypatch.chdir(tmp_path)
    # the tools are imported afresh (no module-level import or cached result from earlier tests), the extra not at all
    stale = [k for k in sys.modules if k == module or k.startswith((module + ".", "open_clip_sigrel.tools"))]
    for name in stale:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import -> ModuleNotFoundError, as when not installed
    with pytest.raises(ImportError, match=rf"pip install 'open_clip_sigrel\[{extra}\]'"):
        call()


def test_missing_training_libraries_name_the_train_extra(monkeypatch):
    from open_clip_sigrel import hosts

    for name in [k for k in sys.modules if k.startswith("open_clip_train")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import webdataset -> ModuleNotFoundError
    with pytest.raises(ImportError, match=r"webdataset is missing.*open_clip_sigrel\[train\]"):
        hosts.select()


def test_training_options_raise_in_the_library_and_exit_2_in_the_cli(capsys):
    from open_clip_sigrel.cli.train import parse_args
    from open_clip_sigrel.hosts.options import SigrelOptionError, resolve_args

    args = parse_args(["--train-data", "x.tar", "--model", "sigrel-tiny", "--loss", "sigrel"])
    bad = argparse.Namespace(**{**vars(args), "sigrel_init_logit_scale": -1.0})
    with pytest.raises(SigrelOptionError, match="finite and > 0"):  # a ValueError, not SystemExit
        resolve_args(bad)
    assert issubclass(SigrelOptionError, ValueError)
    with pytest.raises(SystemExit) as exc:
        parse_args(["--train-data", "x.tar", "--model", "sigrel-tiny", "--loss", "sigrel",
                    "--sigrel-init-logit-scale", "-1"])
    assert exc.value.code == 2 and "finite and > 0" in capsys.readouterr().err


PACKAGE = Path(bias.__file__).parent
DOCTESTED = sorted(
    ".".join(("open_clip_sigrel", *f.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for f in PACKAGE.rglob("*.py") if ">>> " in f.read_text()
)


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples(module):
    """Every example in the package's docstrings runs and prints what it says."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0

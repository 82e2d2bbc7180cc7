"""The demo, make-data and eval command lines: flags built from each tool's config dataclass, and the
optional extras (data, plots) failing with a message that names them."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from open_clip_sigrel.cli import build_parser
from open_clip_sigrel.cli._fields import config_from_args
from open_clip_sigrel.tools.data import DigitsConfig, make_digits_dataset
from open_clip_sigrel.tools.demo import DemoConfig
from open_clip_sigrel.tools.evaluate import EvalConfig

# (subcommand, its config, flags it needs besides the config's)
TOOLS = (("demo", DemoConfig, []), ("make-data", DigitsConfig, ["--output", "x"]),
         ("eval", EvalConfig, ["--output", "x"]))


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv[:1]).parse_args(argv)


@pytest.mark.parametrize("command,config_cls,required", TOOLS, ids=[t[0] for t in TOOLS])
def test_every_setting_is_a_flag_with_the_configs_default(command, config_cls, required):
    args = _parse([command, *required])
    assert config_from_args(config_cls, args) == config_cls()
    parser = build_parser([command])._subparsers._group_actions[0].choices[command]
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(config_cls)} <= dests  # no setting unreachable from the CLI


def test_flags_set_the_config():
    args = _parse(["make-data", "--output", "x", "--n-train", "20", "--no-csv", "--seed", "3"])
    assert config_from_args(DigitsConfig, args) == DigitsConfig(n_train=20, csv=False, seed=3)
    args = _parse(["demo", "--epochs", "2", "--lr", "0.01", "--data-dir", "d"])
    assert config_from_args(DemoConfig, args) == DemoConfig(epochs=2, lr=0.01, data_dir="d")
    args = _parse(["eval", "--output", "x", "--precision", "amp_bf16", "--max-samples", "5"])
    assert config_from_args(EvalConfig, args) == EvalConfig(precision="amp_bf16", max_samples=5)
    with pytest.raises(SystemExit):  # choices come from the config too
        _parse(["eval", "--output", "x", "--precision", "fp8"])


def test_help_shows_the_configs_defaults(capsys):
    with pytest.raises(SystemExit):
        _parse(["make-data", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"number of training samples (default: {DigitsConfig().n_train})" in text
    # a --no-X flag tells no default: "(default: True)" beside it would read as the opposite
    no_csv = text[text.index("--no-csv write only"):text.index("--overwrite replace")]
    assert "tab-separated CSVs" in no_csv and "default" not in no_csv


def test_config_checks_its_settings():
    with pytest.raises(ValueError, match="n_val must be an integer, got True"):
        DigitsConfig(n_val=True)
    with pytest.raises(TypeError):
        make_digits_dataset("unused", no_such_setting=1)
    with pytest.raises(ValueError, match="--n-train"):
        DemoConfig(n_train=16, batch_size=32).check()
    with pytest.raises(ValueError, match="exactly one of --data"):
        EvalConfig().check()


EXTRAS = ("sklearn", "webdataset", "pandas", "matplotlib", "braceexpand", "scipy")


def test_core_works_without_the_extras_and_each_tool_names_its_extra(tmp_path):
    """With the optional packages made unimportable, the tools import, eval of embeddings works, and what
    needs an extra exits 1 naming it (pip install 'open_clip_sigrel[...]'), having written nothing."""
    stubs = tmp_path / "stubs"
    for module in EXTRAS:  # import fails, but importlib.util.find_spec still finds them (as torch probes)
        (stubs / module).mkdir(parents=True)
        (stubs / module / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    script = textwrap.dedent("""
        import contextlib, io, json, os, sys
        import numpy as np
        from open_clip_sigrel.cli import main
        d = sys.argv[1]
        np.savez(os.path.join(d, "e.npz"), image=np.random.randn(10, 4), text=np.random.randn(10, 4))
        runs = {
            "eval": ["eval", "--embeddings", os.path.join(d, "e.npz"), "--output", os.path.join(d, "o.json")],
            "eval_plots": ["eval", "--embeddings", os.path.join(d, "e.npz"), "--output", os.path.join(d, "p.json"),
                           "--plots", os.path.join(d, "plots")],
            "make_data": ["make-data", "--output", os.path.join(d, "ds")],
            "demo": ["demo", "--output", os.path.join(d, "demo"), "--quiet"],
        }
        out = {}
        for name, argv in runs.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                out[name] = [main(argv), err.getvalue()]
        out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(","))
        print(json.dumps(out))
    """)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(stubs)}
    proc = subprocess.run([sys.executable, "-c", script, str(work), ",".join(EXTRAS)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["eval"][0] == 0 and json.loads((work / "o.json").read_text())["metrics"]["n_pairs"] == 10
    for name, extra in (("eval_plots", "plots"), ("make_data", "data"), ("demo", "data")):
        code, err = res[name]
        assert code == 1 and f"pip install 'open_clip_sigrel[{extra}]'" in err, (name, err)
    assert not (work / "p.json").exists() and not (work / "ds").exists() and not (work / "demo" / "runs").exists()
    assert res["loaded"] == []

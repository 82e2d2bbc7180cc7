"""The small core modules: the sign convention, the JSONL reader / table, optional extras, training options."""
import argparse
import json
import sys

import pytest
import torch

from open_clip_sigrel import _io, bias
from open_clip_sigrel._optional import EXTRAS, require


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
        _io.read_jsonl(path)
    assert _io.read_jsonl(path, strict=False) == [{"a": 1}, {"a": 2}]
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        _io.read_jsonl(tmp_path / "list.jsonl")
    assert _io.read_jsonl(tmp_path / "absent.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        _io.read_jsonl(tmp_path / "absent.jsonl")


def test_format_table_aligns_columns():
    out = _io.format_table(("name", "x"), [("a", "1.5"), ("long-name", "-2")], title="T").splitlines()
    assert out[0] == "T"
    assert out[1].split() == ["name", "x"] and set(out[2]) == {"-"}
    assert out[3].startswith("a ") and out[3].endswith("1.5") and out[4].endswith(" -2")
    assert len({len(line) for line in out[1:]}) == 1


@pytest.mark.parametrize("extra, module", [(e, m) for e, ms in EXTRAS.items() for m in ms])
def test_a_missing_optional_dependency_names_its_extra(monkeypatch, extra, module):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ModuleNotFoundError, as when not installed
    with pytest.raises(ImportError, match=rf"pip install 'open_clip_sigrel\[{extra}\]'"):
        require(module, extra)


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

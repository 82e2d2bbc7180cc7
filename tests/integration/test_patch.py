"""patches/open_clip-3.3.0-loss-registry.patch on a copy of the installed open_clip 3.3.0.

The environment's own open_clip is never touched: its ``open_clip`` and ``open_clip_train`` packages
are copied into a temporary folder, patched there with ``patch -p1`` and put first on PYTHONPATH of
the subprocesses that train. The entry point ``open_clip.losses: sigrel`` comes from this package's
installed metadata (setup.cfg).
"""
from __future__ import annotations

import json
import re
import subprocess
import textwrap
from importlib.metadata import entry_points, version
from pathlib import Path

import pytest
import torch
from _patching import copy_open_clip, run_patch, subprocess_env

from open_clip_sigrel.hosts.telemetry import read_telemetry

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "patches" / "open_clip-3.3.0-loss-registry.patch"
PATCHED_FILES = ("open_clip/factory.py", "open_clip_train/main.py", "open_clip_train/params.py",
                 "open_clip_train/train.py")
# What the training runs must agree on, record by record, in the plugin's telemetry
# (<logs>/<name>/sigrel_train.jsonl; its epoch and lr need the host's epoch loop, which only
# open-clip-sigrel-train hooks; time differs anyway).
TELEMETRY_KEYS = ("step", "loss", "logit_scale", "rel_bias", "logit_bias", "batch_margin_worst",
                  "batch_rel_bias_worst", "batch_margin_mean", "batch_rel_bias_mean")

pytestmark = pytest.mark.skipif(
    version("open_clip_torch") != "3.3.0",
    reason=f"the patch targets open_clip_torch 3.3.0 (installed: {version('open_clip_torch')})",
)


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A patched copy of the installed open_clip and open_clip_train."""
    root = copy_open_clip(tmp_path_factory.mktemp("oc") / "site")
    result = run_patch(PATCH, "-p1", "--forward", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_patch_applies_cleanly_and_reverses(tmp_path):
    root = copy_open_clip(tmp_path / "site")
    originals = {f: (root / f).read_text() for f in PATCHED_FILES}
    applied = run_patch(PATCH, "-p1", "--forward", cwd=root)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert re.findall(r"^patching file (\S+)", applied.stdout, re.M) == list(PATCHED_FILES)
    assert not re.search(r"offset|fuzz|reject|FAILED", applied.stdout + applied.stderr, re.I), applied.stdout
    assert all((root / f).read_text() != originals[f] for f in PATCHED_FILES)
    assert run_patch(PATCH, "-p1", "--forward", "--dry-run", cwd=root).returncode != 0  # already applied: refused
    reverted = run_patch(PATCH, "-R", "-p1", cwd=root)
    assert reverted.returncode == 0, reverted.stdout + reverted.stderr
    assert {f: (root / f).read_text() for f in PATCHED_FILES} == originals
    assert not list(root.rglob("*.orig")) and not list(root.rglob("*.rej"))


def test_entry_point_group_lists_sigrel():
    eps = {ep.name: ep for ep in entry_points(group="open_clip.losses")}
    assert "sigrel" in eps, "re-install the package (pip install -e .) after changing setup.cfg"
    assert eps["sigrel"].value == "open_clip_sigrel.hosts.plugin:sigrel"
    from open_clip_sigrel.hosts.plugin import sigrel

    assert eps["sigrel"].load() is sigrel
    assert all(callable(getattr(sigrel, hook)) for hook in
               ("add_args", "check_args", "create_model_and_transforms", "create_loss"))


PARSE_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, math, sys
    import open_clip
    import open_clip_train.params as params
    assert params.__file__.startswith(sys.argv[1]), params.__file__
    from open_clip_sigrel.loss import SigRelLoss
    from open_clip_sigrel.model import has_rel_bias, sigrel_values

    base = ["--train-data", "x.csv", "--model", "sigrel-tiny"]

    def run(argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                args = params.parse_args(argv)
                code = 0
            except SystemExit as e:
                args, code = None, e.code
        return args, code, out.getvalue() + err.getvalue()

    report = {}
    a, code, _ = run(base + ["--loss", "sigrel", "--sigrel-init-rel-bias", "0.5"])
    report["sigrel"] = dict(code=code, loss=a.loss, rel=a.sigrel_init_rel_bias, t=a.sigrel_init_logit_scale,
                            normalize=a.sigrel_normalize, max=a.max_logit_scale, siglip=a.siglip)
    a.rank, a.world_size, a.distill = 0, 1, False
    loss = open_clip.create_loss(a)
    report["loss_class"] = type(getattr(loss, "loss", loss)).__name__
    model, _, _ = open_clip.factory.get_loss_plugin("sigrel").create_model_and_transforms(
        a, open_clip.create_model_and_transforms, a.model)
    report["rel_bias"] = has_rel_bias(model) and "rel_bias" in dict(model.named_parameters())
    report["t_b"] = sigrel_values(model)
    b, code, _ = run(["--train-data", "x.csv", "--model", "RN50"])
    report["stock"] = dict(code=code, loss=b.loss, siglip=b.siglip, sigrel=hasattr(b, "sigrel_normalize"),
                           max=getattr(b, "max_logit_scale", "absent"),
                           loss_class=type(open_clip.create_loss(
                               type(b)(**{**vars(b), "rank": 0, "world_size": 1, "distill": False}))).__name__)
    c, code, _ = run(["--model", "RN50", "--loss", "siglip"])
    report["siglip"] = dict(code=code, siglip=c.siglip)
    report["errors"] = {}
    for key, argv in {
        "siglip_and_sigrel": base + ["--loss", "sigrel", "--siglip"],
        "unknown": base + ["--loss", "hinge"],
        "flag_without_loss": base + ["--sigrel-init-rel-bias", "0.5"],
        "bad_value": base + ["--loss", "sigrel", "--sigrel-init-logit-scale", "-1"],
    }.items():
        _, code, text = run(argv)
        report["errors"][key] = [code, text[-300:]]
    _, _, report["help_sigrel"] = run(["--loss", "sigrel", "--help"])
    _, _, report["help"] = run(["--help"])
    print(json.dumps(report))
    """
)


def test_patched_parse_args_loss_and_model_hooks(patched, tmp_path, python):
    script = tmp_path / "parse.py"
    script.write_text(PARSE_SCRIPT)
    result = subprocess.run([python, str(script), str(patched)], capture_output=True, text=True,
                            env=subprocess_env(patched), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["sigrel"] == dict(code=0, loss="sigrel", rel=0.5, t=10.0, normalize="batch", max=100.0,
                                    siglip=False)
    assert report["loss_class"] == "SigRelLoss"
    assert report["rel_bias"] is True
    assert report["t_b"]["logit_scale"] == pytest.approx(10.0) and report["t_b"]["rel_bias"] == pytest.approx(0.5)
    # Without --loss: open_clip as before (no plugin flags, no clamp override, ClipLoss).
    assert report["stock"] == dict(code=0, loss=None, siglip=False, sigrel=False, max="absent",
                                   loss_class="ClipLoss")
    assert report["siglip"] == dict(code=0, siglip=True)
    errors = report["errors"]
    assert errors["siglip_and_sigrel"][0] == 2 and "--siglip contradicts --loss sigrel" in errors["siglip_and_sigrel"][1]
    assert errors["unknown"][0] == 2 and "invalid choice: 'hinge'" in errors["unknown"][1]
    assert "sigrel" in errors["unknown"][1]
    assert errors["flag_without_loss"][0] == 2 and "unrecognized arguments: --sigrel-init-rel-bias" in \
        errors["flag_without_loss"][1]
    assert errors["bad_value"][0] == 2 and "finite and > 0" in errors["bad_value"][1]
    assert "--sigrel-init-rel-bias" in report["help_sigrel"] and "--sigrel-normalize" in report["help_sigrel"]
    assert "{clip,siglip,sigrel}" in report["help"] and "--sigrel-normalize" not in report["help"]


def _train_argv(csv: Path, logs: Path, name: str) -> list[str]:
    return [
        "--model", "sigrel-tiny", "--train-data", str(csv), "--dataset-type", "csv",
        "--batch-size", "16", "--workers", "0", "--lr", "2e-3", "--warmup", "1", "--epochs", "1",
        "--log-every-n-steps", "1", "--logs", str(logs), "--name", name, "--device", "cpu", "--seed", "0",
        "--report-to", "none", "--loss", "sigrel",
    ]


def _records(logs: Path, name: str) -> list[dict]:
    return [{k: r[k] for k in TELEMETRY_KEYS} for r in read_telemetry(logs / name)]


@pytest.fixture(scope="module")
def small_csv(digits_data, tmp_path_factory) -> Path:
    """The first 32 training pairs of the shipped data as open_clip CSV (2 steps of 16; the CSV
    loader's order follows the seeded torch RNG, unlike webdataset's unseeded sample shuffle)."""
    rows = Path(digits_data["train_csv"]).read_text().splitlines()
    path = tmp_path_factory.mktemp("csv") / "train.csv"
    path.write_text("\n".join(rows[:33]) + "\n")
    return path


def test_patched_stock_trainer_matches_plugin_entry(patched, small_csv, tmp_path, python):
    """open_clip_train.main --loss sigrel (patched) == open_clip_sigrel.cli.train --loss sigrel, step by step;
    the plugin's own entry on a patched open_clip is unchanged too (its hooks are not applied twice)."""
    runs = {
        "patched_stock": (["-m", "open_clip_train.main"], patched),
        "plugin": (["-m", "open_clip_sigrel.cli.train"], None),
        "plugin_on_patched": (["-m", "open_clip_sigrel.cli.train"], patched),
    }
    procs = {
        name: subprocess.Popen([python, *module, *_train_argv(small_csv, tmp_path, name)], env=subprocess_env(path),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (module, path) in runs.items()
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
    records = {name: _records(tmp_path, name) for name in runs}
    reference_records = records["plugin"]
    assert [r["step"] for r in reference_records] == [0, 1], reference_records
    assert reference_records[0]["logit_scale"] == pytest.approx(10.0)
    assert reference_records[0]["rel_bias"] == pytest.approx(1.0)
    # Same ops, seed and data order on CPU with one thread: the runs agree to the bit.
    for name in ("patched_stock", "plugin_on_patched"):
        assert records[name] == reference_records, (name, records[name], reference_records)
    sds = {name: torch.load(tmp_path / name / "checkpoints" / "epoch_1.pt", map_location="cpu",
                            weights_only=True)["state_dict"] for name in runs}
    reference = sds["plugin"]
    assert "logit_bias" in reference and "rel_bias" not in reference
    assert abs((-reference["logit_bias"] / reference["logit_scale"].exp()).item() - 1.0) > 1e-5  # b_rel trained
    for name in ("patched_stock", "plugin_on_patched"):
        assert sds[name].keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(sds[name][key], value, rtol=0, atol=0, msg=f"{name}: {key}")
    # The patched stock run's params.txt records the plugin's resolved settings.
    params = (tmp_path / "patched_stock" / "params.txt").read_text()
    assert "loss: sigrel" in params and "sigrel_init_rel_bias: 1.0" in params and "max_logit_scale: 100.0" in params


def test_patched_stock_trainer_torchrun_two_cpu_processes(patched, small_csv, tmp_path, python):
    """The patch's CPU DDP fix: stock 3.3.0 passes device_ids=[cpu] to DDP, which fails under gloo."""
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "open_clip_train.main", "--", *_train_argv(small_csv, tmp_path, "ddp"), "--batch-size", "8"]
    # gloo on the loopback device (_env): a host whose default interface does not route to itself hangs
    # in the first collective (and torchrun's --master_port 0 hangs in the rendezvous; --standalone does not)
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(patched), timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = read_telemetry(tmp_path / "ddp")
    assert [r["step"] for r in records] == [0, 1] and all(0 < r["loss"] < 100 for r in records)
    sd = torch.load(tmp_path / "ddp" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert "module.logit_bias" in sd["state_dict"] and "module.rel_bias" not in sd["state_dict"]

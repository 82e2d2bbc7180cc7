"""patches/open_clip-main-89fb801-task-registry.patch on a copy of the installed open_clip 4.x (main).

As in tests/integration/test_patch.py (the 3.3.0 patch), the environment's own open_clip is never touched: its
``open_clip`` and ``open_clip_train`` packages are copied into a temporary folder, patched there with
``patch -p1`` and put first on PYTHONPATH of the subprocesses. The entry point
``open_clip.losses: sigrel`` comes from this package's installed metadata (setup.cfg). Runs in the
4.x environment (e.g. a venv with the vendored open_clip_torch 4.2.0.dev0 wheel); skipped elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import textwrap
from importlib.metadata import entry_points, version
from pathlib import Path

import open_clip.factory
import pytest
import torch
from _patching import copy_open_clip, run_patch, site_packages, subprocess_env

from open_clip_sigrel.hosts.telemetry import read_telemetry

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "patches" / "open_clip-main-89fb801-task-registry.patch"
PATCHED_FILES = ("open_clip/factory.py", "open_clip_train/main.py", "open_clip_train/params.py")
# What the training runs must agree on, record by record (the telemetry's epoch and lr need the host's
# epoch loop, which only open-clip-sigrel-train hooks; time differs anyway).
TELEMETRY_KEYS = ("step", "loss", "logit_scale", "rel_bias", "logit_bias", "batch_margin_worst",
                  "batch_rel_bias_worst", "batch_margin_mean", "batch_rel_bias_mean")

pytestmark = pytest.mark.skipif(
    not hasattr(open_clip.factory, "create_task"),
    reason=f"the patch targets open_clip 4.x main at 89fb801 (task API); installed: open_clip_torch "
           f"{version('open_clip_torch')}, which has no open_clip.factory.create_task",
)


def _git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A patched copy of the installed open_clip and open_clip_train."""
    root = copy_open_clip(tmp_path_factory.mktemp("oc4") / "site")
    result = run_patch(PATCH, "-p1", "--forward", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_installed_files_are_the_patch_base():
    """The patch's ``index`` lines name the upstream blobs at 89fb801; the installed files must be them."""
    text = PATCH.read_text()
    bases = dict(re.findall(r"^diff --git a/(\S+) b/\S+\nindex ([0-9a-f]+)\.\.", text, re.M))
    assert tuple(bases) == PATCHED_FILES
    site = site_packages()
    for path, short in bases.items():
        assert _git_blob((site / path).read_bytes()).startswith(short), (
            f"{path} of the installed open_clip_torch {version('open_clip_torch')} is not open_clip main "
            f"89fb801's (blob {short}): rebase {PATCH.name}")


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
    assert not re.search(r"offset|fuzz|reject|FAILED", reverted.stdout + reverted.stderr, re.I), reverted.stdout
    assert {f: (root / f).read_text() for f in PATCHED_FILES} == originals
    assert not list(root.rglob("*.orig")) and not list(root.rglob("*.rej"))


def test_entry_point_serves_the_task_hook():
    eps = {ep.name: ep for ep in entry_points(group="open_clip.losses")}
    assert "sigrel" in eps, "re-install the package (pip install -e .) after changing setup.cfg"
    assert eps["sigrel"].value == "open_clip_sigrel.hosts.plugin:sigrel"
    from open_clip_sigrel.hosts.plugin import sigrel

    assert eps["sigrel"].load() is sigrel
    assert all(callable(getattr(sigrel, hook)) for hook in
               ("add_args", "check_args", "create_model_and_transforms", "create_task"))


PARSE_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, math, sys
    import torch
    import open_clip
    import open_clip_train.params as params
    assert params.__file__.startswith(sys.argv[1]), params.__file__
    from open_clip.task import CLIPTask, SigLIPTask
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

    def stock_task(args):
        model, _, _ = open_clip.create_model_and_transforms(args.model, output_dict=True)
        args.rank, args.world_size, args.distill = 0, 1, False  # set by open_clip_train.main
        return open_clip.create_task(args, model)

    report = {}
    a, code, _ = run(base + ["--loss", "sigrel", "--sigrel-init-rel-bias", "0.5", "--sigrel-max-logit-scale", "1000"])
    report["sigrel"] = dict(code=code, loss=a.loss, rel=a.sigrel_init_rel_bias, t=a.sigrel_init_logit_scale,
                            normalize=a.sigrel_normalize, max=a.sigrel_max_logit_scale, siglip=a.siglip,
                            stock_clamp_attr=hasattr(a, "max_logit_scale"))
    a.rank, a.world_size = 0, 1
    plugin = open_clip.factory.get_loss_plugin("sigrel")
    model, _, _ = plugin.create_model_and_transforms(a, open_clip.create_model_and_transforms, a.model,
                                                     output_dict=True)
    report["rel_bias"] = has_rel_bias(model) and "rel_bias" in dict(model.named_parameters())
    report["t_b"] = sigrel_values(model)
    task = open_clip.create_task(a, model)  # the patched factory calls plugin.create_task
    report["task"] = dict(cls=type(task).__name__, siglip_task=isinstance(task, SigLIPTask),
                          loss=type(getattr(task.loss, "loss", task.loss)).__name__,
                          model=task.trainable_module is model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(5000.0))
    task.clamp_logit_scale()
    report["clamped_t"] = model.logit_scale.exp().item()
    try:
        open_clip.create_loss(a)
        report["create_loss"] = "no error"
    except ValueError as e:
        report["create_loss"] = str(e)

    b, code, _ = run(["--train-data", "x.csv", "--model", "RN50"])
    report["stock"] = dict(code=code, loss=b.loss, siglip=b.siglip, sigrel=hasattr(b, "sigrel_normalize"))
    c, code, _ = run(["--model", "sigrel-tiny", "--loss", "siglip"])
    report["siglip"] = dict(code=code, siglip=c.siglip)
    d, code, _ = run(["--model", "sigrel-tiny"])
    report["tasks"] = dict(siglip=type(stock_task(c)).__name__, clip=type(stock_task(d)).__name__)
    report["errors"] = {}
    for key, argv in {
        "siglip_and_sigrel": base + ["--loss", "sigrel", "--siglip"],
        "unknown": base + ["--loss", "hinge"],
        "flag_without_loss": base + ["--sigrel-init-rel-bias", "0.5"],
        "bad_value": base + ["--loss", "sigrel", "--sigrel-init-logit-scale", "-1"],
        "naflex": base + ["--loss", "sigrel", "--use-naflex"],
    }.items():
        _, code, text = run(argv)
        report["errors"][key] = [code, text[-300:]]
    _, _, report["help_sigrel"] = run(["--loss", "sigrel", "--help"])
    _, _, report["help"] = run(["--help"])
    print(json.dumps(report))
    """
)


def test_patched_parse_args_create_task_and_model_hooks(patched, tmp_path, python):
    script = tmp_path / "parse.py"
    script.write_text(PARSE_SCRIPT)
    result = subprocess.run([python, str(script), str(patched)], capture_output=True, text=True,
                            env=subprocess_env(patched), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["sigrel"] == dict(code=0, loss="sigrel", rel=0.5, t=10.0, normalize="batch", max=1000.0,
                                    siglip=False, stock_clamp_attr=False)
    assert report["rel_bias"] is True
    assert report["t_b"]["logit_scale"] == pytest.approx(10.0) and report["t_b"]["rel_bias"] == pytest.approx(0.5)
    assert report["task"] == dict(cls="SigRelTask", siglip_task=True, loss="SigRelLoss", model=True)
    assert report["clamped_t"] == pytest.approx(1000.0, rel=1e-5)  # --sigrel-max-logit-scale, not ln(100)
    assert "plugin loss" in report["create_loss"] and "create_task" in report["create_loss"]
    # Without --loss: open_clip as before (no plugin flags, its own tasks).
    assert report["stock"] == dict(code=0, loss=None, siglip=False, sigrel=False)
    assert report["siglip"] == dict(code=0, siglip=True)
    assert report["tasks"] == dict(siglip="SigLIPTask", clip="CLIPTask")
    errors = report["errors"]
    assert errors["siglip_and_sigrel"][0] == 2 and "--siglip contradicts --loss sigrel" in errors["siglip_and_sigrel"][1]
    assert errors["unknown"][0] == 2 and "invalid choice: 'hinge'" in errors["unknown"][1]
    assert "'sigrel'" in errors["unknown"][1]  # the installed plugins are listed
    assert errors["flag_without_loss"][0] == 2 and "unrecognized arguments: --sigrel-init-rel-bias" in \
        errors["flag_without_loss"][1]
    assert errors["bad_value"][0] == 2 and "finite and > 0" in errors["bad_value"][1]
    assert errors["naflex"][0] == 2 and "NaFlex" in errors["naflex"][1]
    assert "--sigrel-init-rel-bias" in report["help_sigrel"] and "--sigrel-normalize" in report["help_sigrel"]
    assert "{clip,siglip,sigrel}" in report["help"] and "--sigrel-normalize" not in report["help"]


def _train_argv(csv: Path, logs: Path, name: str, epochs: int = 2) -> list[str]:
    return [
        "--model", "sigrel-tiny", "--train-data", str(csv), "--dataset-type", "csv",
        "--batch-size", "16", "--workers", "0", "--lr", "2e-3", "--warmup", "1", "--epochs", str(epochs),
        "--log-every-n-steps", "1", "--logs", str(logs), "--name", name, "--device", "cpu", "--seed", "0",
        "--report-to", "none", "--loss", "sigrel",
    ]


def _records(logs: Path, name: str) -> list[dict]:
    return [{k: r[k] for k in TELEMETRY_KEYS} for r in read_telemetry(logs / name)]


def _sd(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def small_csv(digits_data, tmp_path_factory) -> Path:
    """The first 32 training pairs of the shipped data as open_clip CSV (2 steps of 16; the CSV
    loader's order follows the seeded torch RNG, unlike webdataset's unseeded sample shuffle)."""
    rows = Path(digits_data["train_csv"]).read_text().splitlines()
    path = tmp_path_factory.mktemp("csv4") / "train.csv"
    path.write_text("\n".join(rows[:33]) + "\n")
    return path


def test_patched_stock_trainer_matches_plugin_entry(patched, small_csv, tmp_path, python):
    """open_clip_train.main --loss sigrel (patched 4.x) == open_clip_sigrel.cli.train --loss sigrel, step by
    step over 2 epochs (telemetry) and in the final checkpoint; the plugin's own entry on a patched
    open_clip is unchanged too (its seams are not applied twice)."""
    runs = {
        "patched_stock": (["-m", "open_clip_train.main"], patched),
        "plugin": (["-m", "open_clip_sigrel.cli.train"], None),
        "plugin_on_patched": (["-m", "open_clip_sigrel.cli.train"], patched),
    }
    outputs = {}
    for name, (module, path) in runs.items():  # one at a time: the 2 cores are shared
        proc = subprocess.run([python, *module, *_train_argv(small_csv, tmp_path, name)], env=subprocess_env(path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}"
        outputs[name] = proc.stdout
    records = {name: _records(tmp_path, name) for name in runs}
    reference = records["plugin"]
    assert [r["step"] for r in reference] == [0, 1, 2, 3], reference
    assert reference[0]["logit_scale"] == pytest.approx(10.0) and reference[0]["rel_bias"] == pytest.approx(1.0)
    # Same ops, seed and data order on CPU with one thread: the runs agree to the bit.
    for name in ("patched_stock", "plugin_on_patched"):
        assert records[name] == reference, (name, records[name], reference)
    sds = {name: _sd(tmp_path / name / "checkpoints" / "epoch_2.pt") for name in runs}
    ref_sd = sds["plugin"]
    assert "logit_bias" in ref_sd and "rel_bias" not in ref_sd
    assert abs((-ref_sd["logit_bias"] / ref_sd["logit_scale"].exp()).item() - 1.0) > 1e-5  # b_rel trained
    for name in ("patched_stock", "plugin_on_patched"):
        assert sds[name].keys() == ref_sd.keys()
        for key, value in ref_sd.items():
            torch.testing.assert_close(sds[name][key], value, rtol=0, atol=0, msg=f"{name}: {key}")
    # The patched stock run went through the plugin's task and records the plugin's resolved settings.
    params = (tmp_path / "patched_stock" / "params.txt").read_text()
    assert "loss: sigrel" in params and "sigrel_init_rel_bias: 1.0" in params
    # The task's telemetry keys reach open_clip's own train/ logs (4.x logs every non-loss key of the dict).
    assert re.search(r"Train Epoch: 1 .* Rel_bias: ", outputs["patched_stock"]), outputs["patched_stock"][-2000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_patched_stock_trainer_torchrun_two_cpu_processes(strategy, patched, small_csv, tmp_path, python):
    """2 CPU ranks under torchrun: DDP needs the patch's CPU fix (stock 4.x passes device_ids=[cpu],
    which DDP rejects under gloo); FSDP2 shards the model the plugin extended. Either way the patched
    stock trainer trains as the plugin's entry does."""
    extra = ["--batch-size", "8"] + (["--fsdp", "--precision", "fp32"] if strategy == "fsdp" else [])
    # gloo on the loopback device (_env): a host whose default interface does not route to itself hangs
    # in the first collective (and torchrun's --master_port 0 hangs in the rendezvous; --standalone does not)
    for name, module in (("patched_stock", "open_clip_train.main"), ("plugin", "open_clip_sigrel.cli.train")):
        cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", module, "--", *_train_argv(small_csv, tmp_path, name, epochs=1), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(patched), timeout=300)
        assert result.returncode == 0, f"{name}:\n" + (result.stdout + result.stderr)[-3000:]
    records = {name: _records(tmp_path, name) for name in ("patched_stock", "plugin")}
    assert [r["step"] for r in records["patched_stock"]] == [0, 1]
    assert all(0 < r["loss"] < 100 for r in records["patched_stock"])
    assert records["patched_stock"] == records["plugin"]
    sd = _sd(tmp_path / "patched_stock" / "checkpoints" / "epoch_1.pt")
    assert "logit_bias" in sd and "rel_bias" not in sd and sd["logit_bias"].ndim == 0
    assert abs((-sd["logit_bias"] / sd["logit_scale"].exp()).item() - 1.0) > 1e-6  # b_rel trained on 2 ranks
    reference = _sd(tmp_path / "plugin" / "checkpoints" / "epoch_1.pt")
    assert sd.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(sd[key], value, rtol=0, atol=0, msg=key)

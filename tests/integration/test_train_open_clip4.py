"""open_clip 4.x only: --loss sigrel with FSDP2 (gloo, CPU) and every --torchcompile strategy.

The host-agnostic behaviour (loss falls, resume, telemetry, stock loading, DDP) is tests/integration/test_train.py,
which .ci/run runs against 3.3.0, 2.30.0 and the 4.x wheel; this module needs 4.x's task API and runs
in the 4.x environment (.ci/version_matrix.sh with the vendored wheel).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import open_clip_train.main as oc_main
import pytest
import torch

from open_clip_sigrel.cli import train as sigrel_train
from open_clip_sigrel.hosts import telemetry

pytestmark = pytest.mark.skipif(
    not hasattr(oc_main, "create_task"),
    reason="open_clip 4.x (task API) not installed; .ci/run runs this module against the 4.x wheel",
)


def _argv(data, logs, name, *extra, epochs=2, csv=False):
    # csv: the CSV loader's order follows the seeded torch RNG (webdataset's sample shuffle is unseeded)
    source = (["--train-data", data["train_csv"], "--dataset-type", "csv"] if csv else
              ["--train-data", data["train_data"], "--train-num-samples", str(data["train_num_samples"]),
               "--dataset-type", "webdataset"])
    return [
        "--model", "sigrel-tiny", *source,
        "--batch-size", "32", "--workers", "0", "--lr", "2e-3", "--warmup", "2", "--epochs", str(epochs),
        "--log-every-n-steps", "4", "--log-metric-every-n-steps", "2", "--logs", str(logs), "--name", name,
        "--device", "cpu", "--seed", "0", "--report-to", "tensorboard", *extra,
    ]


def _torchrun(python, argv, nproc=2, timeout=300):
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "open_clip_sigrel.cli.train", "--", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def _sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _t_b(sd, prefix=""):
    t = sd[prefix + "logit_scale"].exp().item()
    return t, -sd[prefix + "logit_bias"].item() / t


@pytest.fixture(scope="module")
def fsdp_run(digits_data, tmp_path_factory, python):
    logs = tmp_path_factory.mktemp("fsdp")
    _torchrun(python, _argv(digits_data, logs, "fsdp", "--loss", "sigrel", "--fsdp", "--precision", "fp32",
                            "--val-data", digits_data["val_data"], "--val-num-samples",
                            str(digits_data["val_num_samples"])))
    return logs


def test_fsdp_trains_t_and_rel_bias(fsdp_run):
    records = telemetry.read_telemetry(fsdp_run / "fsdp")
    assert records[0]["logit_scale"] == pytest.approx(10.0) and records[0]["rel_bias"] == pytest.approx(1.0)
    assert sum(r["loss"] for r in records[-3:]) < 0.8 * sum(r["loss"] for r in records[:3])
    t, b = _t_b(_sd(fsdp_run / "fsdp" / "checkpoints" / "epoch_2.pt"))
    assert abs(t - 10.0) > 1e-3 and abs(b - 1.0) > 1e-4
    assert t == pytest.approx(records[-1]["logit_scale"], rel=0.02) and b == pytest.approx(records[-1]["rel_bias"],
                                                                                            abs=0.01)
    rows = [json.loads(x) for x in (fsdp_run / "fsdp" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "margin_mean" in rows[-1]
    assert rows[-1]["rel_bias_model"] == pytest.approx(b, rel=1e-4)  # rank 0 read its shard, no collective


def test_fsdp_checkpoint_loads_in_stock_open_clip_4(fsdp_run, stock_logits):
    ckpt = fsdp_run / "fsdp" / "checkpoints" / "epoch_2.pt"
    sd = _sd(ckpt)
    assert "rel_bias" not in sd and sd["logit_scale"].ndim == 0 and sd["logit_bias"].ndim == 0
    logits, s = stock_logits(ckpt)
    t, b = _t_b(sd)
    torch.testing.assert_close(logits, t * (s - b), rtol=1e-5, atol=1e-4)  # t (s - b_rel)


def test_fsdp_sharded_checkpoint_resumes_t_and_rel_bias_exactly(digits_data, tmp_path, python):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    # amp_bf16 (FSDP2's bf16 MixedPrecisionPolicy) and --accum-freq 2 (set_requires_gradient_sync) on the way
    common_flags = ["--loss", "sigrel", "--fsdp", "--precision", "amp_bf16", "--accum-freq", "2",
                    "--fsdp-checkpoint", "sharded"]
    _torchrun(python, _argv(digits_data, tmp_path, "sharded", *common_flags, epochs=1))
    shard_dir = tmp_path / "sharded" / "checkpoints" / "epoch_1"
    assert (shard_dir / ".metadata").exists()
    dcp_to_torch_save(shard_dir, tmp_path / "epoch_1.pt")  # what the shards hold, read without the plugin
    saved = torch.load(tmp_path / "epoch_1.pt", weights_only=True)["model"]
    assert "rel_bias" not in saved  # the sharded checkpoint carries stock keys too
    t, b = _t_b({k: v.reshape(()) for k, v in saved.items() if k.startswith("logit_")})
    # lr 0: every step of the resumed run shows exactly what was restored.
    _torchrun(python, _argv(digits_data, tmp_path, "resumed", *common_flags, "--resume", str(shard_dir),
                            "--lr", "0", epochs=2))
    resumed = telemetry.read_telemetry(tmp_path / "resumed")
    assert resumed[0]["step"] == digits_data["train_num_samples"] // (32 * 2 * 2)  # epoch 1 starts after epoch 0
    assert resumed[0]["logit_scale"] == pytest.approx(t, rel=1e-6) and resumed[0]["rel_bias"] == pytest.approx(
        b, abs=1e-6)
    assert abs(b - 1.0) > 1e-4  # epoch 1 did move b_rel: the resume restored a trained value


def _losses(logs, name):
    return [r["loss"] for r in telemetry.read_telemetry(Path(logs) / name)]


@pytest.fixture(scope="module")
def eager_losses(digits_data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("eager")
    assert sigrel_train.main(_argv(digits_data, logs, "eager", "--loss", "sigrel", "--precision", "fp32",
                                   "--log-metric-every-n-steps", "1", epochs=1, csv=True)) == 0
    return _losses(logs, "eager")


@pytest.mark.parametrize("strategy", ["model", "task", "step"])
def test_torchcompile_strategies_train_like_eager(digits_data, tmp_path, eager_losses, strategy):
    # aot_eager traces forward and backward through dynamo / AOTAutograd like inductor does, without a C++ build.
    argv = _argv(digits_data, tmp_path, strategy, "--loss", "sigrel", "--precision", "fp32",
                 "--log-metric-every-n-steps", "1", "--torchcompile", "--torchcompile-strategy", strategy,
                 "--torchcompile-backend", "aot_eager", epochs=1, csv=True)
    assert sigrel_train.main(argv) == 0
    losses = _losses(tmp_path, strategy)
    assert len(losses) == len(eager_losses) == 16
    assert losses == pytest.approx(eager_losses, rel=2e-3, abs=2e-3)

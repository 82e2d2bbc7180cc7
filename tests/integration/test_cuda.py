"""GPU checks: SigRelLoss against open_clip's SigLipLoss on a CUDA device, its memory, a short training run.

Skipped (the reason shows with pytest -rs / -ra) where torch sees no CUDA device. benchmarks/cuda_check.sh
runs this module, then the loss and training benchmarks, on a GPU machine.

SIGREL_CUDA_TESTS_DEVICE=cpu runs the same tests on CPU (a dry run of their code paths, the memory check at
a smaller batch); any other value is a torch device to run on instead of "cuda".
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from open_clip_sigrel import SigRelLoss

DEVICE = os.environ.get("SIGREL_CUDA_TESTS_DEVICE", "cuda")
ON_CUDA = torch.device(DEVICE).type == "cuda"


def _no_cuda_reason() -> str:
    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {built}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "SIGREL_CUDA_TESTS_DEVICE=cpu dry-runs these tests on CPU")


pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason=_no_cuda_reason())

DIM = 768
# (t, logit_bias): SigLIP's initialization (b_rel = 1), and a trained-like regime (b_rel = 0.2) where many
# negatives sit near the decision boundary and contribute to the gradients.
SCALES = [(10.0, -10.0), (30.0, -6.0)]
# B x B memory of SigLipLoss vs O(B d) of SigRelLoss; on CPU (dry run) a smaller batch keeps it quick.
MEMORY_BATCH = 16384 if ON_CUDA else 8192


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """fp32 means fp32: no TF32 in cuBLAS while these tests run (restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _features(batch: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image / text features in fp64 on CPU: paired rows close, a 32-dim latent so negatives vary."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 32, generator=g, dtype=torch.float64)
    img = F.normalize(latent @ torch.randn(32, dim, generator=g, dtype=torch.float64), dim=-1)
    noise = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    return img, F.normalize(img + 0.5 * noise, dim=-1)


def _loss_and_grads(loss_fn, img, txt, t: float, logit_bias: float, scalar_dtype=torch.float32) -> dict:
    """Value and gradients (image and text features, logit_scale, logit_bias) of one call, all on DEVICE."""
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    scale = torch.tensor(t, dtype=scalar_dtype, device=img.device, requires_grad=True)
    bias = torch.tensor(logit_bias, dtype=scalar_dtype, device=img.device, requires_grad=True)
    loss = loss_fn(img, txt, logit_scale=scale, logit_bias=bias)
    loss.backward()
    assert all(x.grad is not None for x in (img, txt, scale, bias))
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad, "bias": bias.grad}


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in fp64 (a whole gradient at once: robust to elements near zero)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def _errors(out: dict, ref: dict) -> dict[str, float]:
    return {k: _rel_err(out[k], ref[k]) for k in ("loss", "img", "txt", "scale", "bias")}


def _reference(img, txt, t, logit_bias) -> dict:
    """open_clip's SigLipLoss in float64 on DEVICE: the definition, computed exactly enough to judge fp32."""
    return _loss_and_grads(SigLipLoss(), img.to(DEVICE, torch.float64), txt.to(DEVICE, torch.float64), t,
                           logit_bias, scalar_dtype=torch.float64)


@pytest.mark.parametrize("t, logit_bias", SCALES)
@pytest.mark.parametrize("batch", [1024, 4096])
def test_sigrel_matches_siglip_fp32(batch, t, logit_bias):
    """fp32 features: SigRelLoss and SigLipLoss agree with each other and with float64, values and gradients."""
    img64, txt64 = _features(batch, DIM)
    img, txt = img64.to(DEVICE, torch.float32), txt64.to(DEVICE, torch.float32)
    ref = _reference(img, txt, t, logit_bias)
    sigrel = _loss_and_grads(SigRelLoss(), img, txt, t, logit_bias)
    siglip = _loss_and_grads(SigLipLoss(), img, txt, t, logit_bias)
    for out in (sigrel, siglip):
        assert out["loss"].dtype == torch.float32 and out["img"].dtype == torch.float32
        assert out["loss"].device.type == img.device.type and out["img"].device.type == img.device.type
    assert math.isfinite(float(sigrel["loss"])) and float(sigrel["loss"]) > 0
    errs = {"sigrel-vs-siglip": _errors(sigrel, siglip), "sigrel-vs-fp64": _errors(sigrel, ref),
            "siglip-vs-fp64": _errors(siglip, ref)}
    for name, err in errs.items():
        for key, value in err.items():
            assert value < 2e-5, f"{name} {key}: relative error {value:.2e} (all: {json.dumps(errs)})"


@pytest.mark.parametrize("t, logit_bias", SCALES)
@pytest.mark.parametrize("batch", [1024, 4096])
def test_sigrel_bf16_inputs_match_the_fp64_reference(batch, t, logit_bias):
    """bf16 features (fp32 scalars, as under amp_bf16): both losses against float64 on the same bf16 values.

    SigRelLoss accumulates in fp32 and returns bf16 feature gradients (bf16 rounding, ~2e-3 relative);
    SigLipLoss computes the B x B logits in bf16, so it is looser: its bound only checks that the reference
    and the comparison are meaningful.
    """
    img64, txt64 = _features(batch, DIM)
    img, txt = img64.to(DEVICE, torch.bfloat16), txt64.to(DEVICE, torch.bfloat16)
    ref = _reference(img, txt, t, logit_bias)  # the bf16 values, exactly
    sigrel = _loss_and_grads(SigRelLoss(), img, txt, t, logit_bias)
    siglip = _loss_and_grads(SigLipLoss(), img, txt, t, logit_bias)
    assert sigrel["img"].dtype == sigrel["txt"].dtype == torch.bfloat16
    assert sigrel["loss"].dtype == torch.float32  # sigrel's value is fp32 also from bf16 inputs
    err_sigrel, err_siglip = _errors(sigrel, ref), _errors(siglip, ref)
    detail = json.dumps({"sigrel-vs-fp64": err_sigrel, "siglip-vs-fp64": err_siglip})
    for key, bound in {"loss": 1e-4, "scale": 1e-4, "bias": 1e-4, "img": 1e-2, "txt": 1e-2}.items():
        assert err_sigrel[key] < bound, f"sigrel bf16 {key}: relative error {err_sigrel[key]:.2e} ({detail})"
    for key, value in err_siglip.items():
        assert value < 0.1, f"siglip bf16 {key}: relative error {value:.2e} ({detail})"


def _peak_extra_bytes(impl: str, batch: int) -> tuple[int, float]:
    """Extra memory of one forward + backward over its inputs, through benchmarks/bench.py's step and meters."""
    from _benchmarks import load_bench

    bench = load_bench()
    device = torch.device(DEVICE)
    step, leaves = bench._loss_step({"impl": impl, "batch": batch, "dim": DIM, "dtype": "fp32"}, device)
    step()  # warm-up: cuBLAS workspaces and the like are not the loss's memory
    if device.type == "cuda":
        torch.cuda.synchronize()
    gc.collect()
    meter = bench._CudaPeak() if device.type == "cuda" else bench.PeakRSS()
    with meter:
        loss = float(step())
    del step, leaves
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return meter.peak_extra, loss


def test_sigrel_extra_memory_is_far_below_siglip():
    """B = 16384 (fp32, d = 768): SigLipLoss holds several B x B tensors (1 GiB each), SigRelLoss O(B d)."""
    sigrel, loss_sigrel = _peak_extra_bytes("sigrel", MEMORY_BATCH)
    siglip, loss_siglip = _peak_extra_bytes("open_clip", MEMORY_BATCH)
    mib = 1 << 20
    summary = f"B={MEMORY_BATCH}: sigrel {sigrel / mib:.0f} MiB, siglip {siglip / mib:.0f} MiB"
    print(summary)
    assert siglip >= 2 * MEMORY_BATCH * MEMORY_BATCH * 4, summary  # at least two fp32 B x B buffers
    assert sigrel < 0.25 * siglip, summary
    assert loss_sigrel == pytest.approx(loss_siglip, rel=1e-4)


def test_bench_loss_runs_on_the_device(capsys):
    """`python benchmarks/bench.py loss --device cuda` end to end at a small size: workers, meters, ratios."""
    from _benchmarks import load_bench

    if not ON_CUDA:
        pytest.skip("bench loss --device cuda needs CUDA (its CPU runs are covered by tests/integration/test_bench.py)")
    assert load_bench().main(["loss", "--device", "cuda", "--batch", "1024", "--dim", "64", "--repeats", "2",
                              "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["environment"]["memory_method"] == "cuda_max_memory_allocated" and doc["environment"]["gpu"]
    rows = {r["impl"]: r for r in doc["rows"]}
    for row in rows.values():
        assert not row.get("error"), row
        assert row["time_ms"] > 0 and row["peak_extra_MiB"] > 0 and row["time_ratio"] and row["mem_ratio"]
    assert rows["sigrel"]["loss"] == pytest.approx(rows["open_clip"]["loss"], rel=1e-4)
    assert rows["sigrel"]["mem_ratio"] < 1


def test_short_training_run(digits_data, tmp_path):
    """`python -m open_clip_sigrel.cli.train --loss sigrel` for one epoch on the device with amp_bf16."""
    logs, name = tmp_path / "logs", "x"
    cmd = [sys.executable, "-m", "open_clip_sigrel.cli.train", "--loss", "sigrel", "--model", "sigrel-tiny",
           "--train-data", digits_data["train_data"], "--train-num-samples", str(digits_data["train_num_samples"]),
           "--dataset-type", "webdataset", "--batch-size", "64", "--epochs", "1", "--workers", "0",
           "--device", DEVICE, "--precision", "amp_bf16", "--logs", str(logs), "--name", name,
           "--warmup", "2", "--lr", "2e-3", "--log-every-n-steps", "1", "--seed", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{tail}"
    ckpt = logs / name / "checkpoints" / "epoch_1.pt"
    assert ckpt.exists(), f"no checkpoint at {ckpt}; output:\n{tail}"
    log = (logs / name / "out.log").read_text()
    assert log.count("Train Epoch: 0") >= 2, log[-2000:]
    if ON_CUDA:  # it ran on the GPU: open_clip logs "... Device cuda:0." and writes "device: cuda:0" to params.txt
        params = logs / name / "params.txt"
        seen = log + (params.read_text() if params.exists() else "")
        assert re.search(r"[Dd]evice:? cuda", seen), log[-2000:]
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if torch.is_tensor(v) and v.is_floating_point())
    assert Path(ckpt).stat().st_size > 0

"""End to end through the training entry on the shipped real-image data (CPU, offline)."""
import json
import math
import re
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from open_clip_sigrel.cli import train as sigrel_train
from open_clip_sigrel.hosts import common, open_clip3, telemetry
from open_clip_sigrel.model import sigrel_values


def _argv(data, logs, name, *extra, epochs=2, val=True):
    argv = [
        "--model", "sigrel-tiny", "--train-data", data["train_data"],
        "--train-num-samples", str(data["train_num_samples"]), "--dataset-type", "webdataset",
        "--batch-size", "32", "--workers", "0", "--lr", "2e-3", "--warmup", "2", "--epochs", str(epochs),
        "--log-every-n-steps", "1", "--logs", str(logs), "--name", name, "--device", "cpu", "--seed", "0",
        "--report-to", "tensorboard",
    ]
    if val:
        argv += ["--val-data", data["val_data"], "--val-num-samples", str(data["val_num_samples"])]
    return argv + list(extra)


def _train_lines(logs, name):
    """(t, loss, b_rel, logit_bias) of every log step, from the run's structured telemetry."""
    return [(r["logit_scale"], r["loss"], r["rel_bias"], r["logit_bias"])
            for r in telemetry.read_telemetry(Path(logs) / name)]


def _ckpt(logs, name, epoch):
    return torch.load(Path(logs) / name / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=True)


def _b_rel(sd):
    return (-sd["logit_bias"] / sd["logit_scale"].exp()).item()


@pytest.fixture(scope="module")
def sigrel_run(digits_data, tmp_path_factory, monkeypatch_module):
    """One single-process --loss sigrel run, with the optimizer and model captured."""
    logs = tmp_path_factory.mktemp("logs")
    seen = {}
    original_adamw, original_enable = torch.optim.AdamW, common.enable_rel_bias

    class SpyAdamW(original_adamw):
        def __init__(self, groups, **kw):
            seen["groups"] = groups
            super().__init__(groups, **kw)

    def spy_enable(model, **kw):
        seen["model"] = model
        return original_enable(model, **kw)

    monkeypatch_module.setattr(torch.optim, "AdamW", SpyAdamW)
    monkeypatch_module.setattr(common, "enable_rel_bias", spy_enable)
    assert sigrel_train.main(_argv(digits_data, logs, "sigrel", "--loss", "sigrel")) == 0
    return logs, seen


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_sigrel_trains_loss_falls_and_both_scalars_move(sigrel_run):
    logs, _ = sigrel_run
    lines = _train_lines(logs, "sigrel")
    assert len(lines) >= 16
    first, last = lines[0], lines[-1]
    assert first[0] == pytest.approx(10.0, abs=1e-3) and first[2] == pytest.approx(1.0, abs=1e-3)
    assert sum(x[1] for x in lines[-4:]) / 4 < 0.8 * sum(x[1] for x in lines[:4]) / 4  # loss falls
    sd = _ckpt(logs, "sigrel", 2)["state_dict"]
    assert "rel_bias" not in sd and abs(_b_rel(sd) - 1.0) > 1e-3 and abs(sd["logit_scale"].exp() - 10.0) > 1e-2
    assert last[3] == pytest.approx(-last[0] * last[2], rel=1e-3, abs=1e-3)  # logged logit_bias = -t b_rel


def test_t_and_rel_bias_are_in_the_no_weight_decay_group(sigrel_run):
    _, seen = sigrel_run
    model, groups = seen["model"], seen["groups"]
    no_wd = next(g for g in groups if g["weight_decay"] == 0.0)
    ids = {id(p) for p in no_wd["params"]}
    assert id(model.rel_bias) in ids and id(model.logit_scale) in ids
    assert all(id(model.rel_bias) not in {id(p) for p in g["params"]} for g in groups if g["weight_decay"] > 0)


def test_geometry_metrics_reach_results_jsonl_and_tensorboard(sigrel_run):
    logs, _ = sigrel_run
    rows = [json.loads(x) for x in (Path(logs) / "sigrel" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("margin_mean", "rel_bias_worst", "rel_bias_model", "uniformity_image", "image_to_text_R@1"):
        assert key in rows[-1]
    assert "linear_separability" not in rows[-1]  # the cheap default set: no L-BFGS fit per evaluation
    t, b = rows[-1]["logit_scale"], rows[-1]["rel_bias_model"]
    sd = _ckpt(logs, "sigrel", 2)["state_dict"]
    assert t == pytest.approx(sd["logit_scale"].exp().item(), rel=1e-4) and b == pytest.approx(_b_rel(sd), rel=1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(logs) / "sigrel" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val/margin_mean", "train/rel_bias", "train/logit_bias", "train/batch_margin_worst"} <= tags
    # At open_clip's own steps, with the values of the structured telemetry.
    host_steps = [e.step for e in acc.Scalars("train/loss")]
    records = telemetry.read_telemetry(Path(logs) / "sigrel")
    for tag in ("train/rel_bias", "train/batch_margin_worst"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == host_steps == [r["step"] for r in records]
        key = tag.split("/", 1)[1]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-5, abs=1e-6)


def test_checkpoint_loads_in_stock_open_clip_with_the_same_logits(sigrel_run, stock_logits):
    logs, seen = sigrel_run
    ckpt = Path(logs) / "sigrel" / "checkpoints" / "epoch_2.pt"
    stock, _ = stock_logits(ckpt)
    model = seen["model"].eval()
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    torch.manual_seed(0)
    img, txt = torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16))
    with torch.no_grad():
        out = model(img, txt)
        s = out["image_features"] @ out["text_features"].T
        ours = out["logit_scale"] * (s - model.rel_bias)  # t (s - b_rel)
    torch.testing.assert_close(stock, ours.double(), rtol=1e-4, atol=1e-4)


def test_resume_restores_t_and_rel_bias(sigrel_run, digits_data):
    logs, _ = sigrel_run
    sd = _ckpt(logs, "sigrel", 1)["state_dict"]
    ckpt = Path(logs) / "sigrel" / "checkpoints" / "epoch_1.pt"
    # lr 0: the first logged step shows exactly what was restored.
    argv = _argv(digits_data, logs, "resumed", "--loss", "sigrel", "--resume", str(ckpt), "--lr", "0", val=False)
    assert sigrel_train.main(argv) == 0
    t, _, b, _ = _train_lines(logs, "resumed")[0]
    assert t == pytest.approx(sd["logit_scale"].exp().item(), abs=1e-3)
    assert b == pytest.approx(_b_rel(sd), abs=1e-4)


@pytest.mark.parametrize("t_max", [1000.0, math.inf])
def test_max_logit_scale_replaces_open_clips_clamp(digits_data, tmp_path, t_max):
    """t = 150 survives training when --sigrel-max-logit-scale lifts open_clip's clamp at 100."""
    flags = ["--loss", "sigrel", "--sigrel-init-logit-scale", "150", "--lr", "1e-6", "--sigrel-max-logit-scale", str(t_max)]
    assert sigrel_train.main(_argv(digits_data, tmp_path, "clamp", *flags, epochs=1, val=False)) == 0
    t = _ckpt(tmp_path, "clamp", 1)["state_dict"]["logit_scale"].exp().item()
    assert t == pytest.approx(150.0, rel=1e-3)


def test_telemetry_survives_silenced_console_logging(digits_data, tmp_path):
    """The scalars are data, not log text: with every log record dropped they still arrive."""
    import logging

    logging.disable(logging.CRITICAL)
    try:
        assert sigrel_train.main(_argv(digits_data, tmp_path, "quiet", "--loss", "sigrel", epochs=1, val=False)) == 0
    finally:
        logging.disable(logging.NOTSET)
    assert "Train Epoch" not in (tmp_path / "quiet" / "out.log").read_text()
    records = telemetry.read_telemetry(tmp_path / "quiet")
    assert [r["step"] for r in records] == list(range(16))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "quiet" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/rel_bias")] == list(range(16))


def test_fixed_rel_bias_stays_fixed_while_t_moves(digits_data, tmp_path):
    argv = _argv(digits_data, tmp_path, "fixed", "--loss", "sigrel", "--sigrel-fixed-rel-bias",
                 "--sigrel-init-rel-bias", "0.3", "--sigrel-init-logit-scale", "5",
                 "--precision", "amp_bf16", "--grad-checkpointing", epochs=1, val=False)
    assert sigrel_train.main(argv) == 0
    sd = _ckpt(tmp_path, "fixed", 1)["state_dict"]
    assert _b_rel(sd) == pytest.approx(0.3, abs=1e-6)
    assert abs(sd["logit_scale"].exp().item() - 5.0) > 1e-3


def test_siglip_run_gets_geometry_too(digits_data, tmp_path):
    assert sigrel_train.main(_argv(digits_data, tmp_path, "siglip", "--loss", "siglip", epochs=1)) == 0
    row = json.loads((tmp_path / "siglip" / "checkpoints" / "results.jsonl").read_text().splitlines()[-1])
    assert "margin_mean" in row and row["rel_bias_model"] == pytest.approx(
        -row["logit_bias"] / row["logit_scale"], rel=1e-6)
    first = telemetry.read_telemetry(tmp_path / "siglip")[0]  # a stock SigLIP run has the same telemetry
    assert first["rel_bias"] == pytest.approx(1.0) and first["logit_bias"] == pytest.approx(-10.0)


def test_torchrun_two_cpu_processes(digits_data, tmp_path, python):
    with socket.socket() as sock:  # torchrun needs a real port (0 hangs its rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "open_clip_sigrel.cli.train", "--", *_argv(digits_data, tmp_path, "ddp", "--loss", "sigrel",
                                                   "--accum-freq", "2", "--sigrel-fixed-logit-scale", val=False)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _train_lines(tmp_path, "ddp")
    assert lines and lines[-1][1] < lines[0][1]
    # open_clip 3.x keeps DDP's "module." prefix in checkpoints, 4.x saves the unwrapped model.
    sd = {k.removeprefix("module."): v for k, v in _ckpt(tmp_path, "ddp", 2)["state_dict"].items()}
    # A frozen t raises no DDP unused-parameter error, stays put, and b_rel trains across ranks.
    assert sd["logit_scale"].exp().item() == pytest.approx(10.0, rel=1e-6)
    assert abs(_b_rel(sd) - 1.0) > 1e-4


def _stock_checkpoint(path, t, logit_bias):
    import open_clip

    from open_clip_sigrel.configs import register_shipped_configs

    register_shipped_configs()
    model = open_clip.create_model("sigrel-tiny", init_logit_bias=logit_bias)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(t))
    if logit_bias is None:
        model.logit_bias = None
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize(
    "logit_bias,flags,expect_t,expect_b",
    [
        # a SigLIP checkpoint: b_rel = -logit_bias / t = +0.11; its t above the clamp (100) is clamped now
        (-12.9, [], 100.0, 12.9 / 117.8),
        (-12.9, ["--sigrel-max-logit-scale", "inf"], 117.8, 12.9 / 117.8),  # the clamp lifted: t kept
        (-12.9, ["--sigrel-init-rel-bias", "0.5"], 100.0, 0.5),  # an explicit flag wins
        (None, ["--sigrel-max-logit-scale", "200"], 117.8, 1.0),  # no bias (a CLIP checkpoint): the default b_rel
    ],
)
def test_pretrained_stock_checkpoint_starts_a_sigrel_fine_tune(tmp_path, logit_bias, flags, expect_t, expect_b):
    import open_clip

    ckpt = _stock_checkpoint(tmp_path / "stock.pt", 117.8, logit_bias)
    args = sigrel_train.parse_args(
        ["--train-data", "x.tar", "--model", "sigrel-tiny", "--loss", "sigrel", "--pretrained", str(ckpt), *flags]
    )
    run = common.SigrelRun(args)
    model, _, _ = run.create_model_and_transforms(
        open_clip.create_model_and_transforms, args.model, args.pretrained, output_dict=True
    )
    assert sigrel_values(model)["logit_scale"] == pytest.approx(expect_t, rel=1e-5)
    assert sigrel_values(model)["rel_bias"] == pytest.approx(expect_b, rel=1e-5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--loss", "sigrel", "--model", "coca_ViT-B-32"], "CoCa"),
        (["--loss", "sigrel", "--distill-model", "ViT-B-32", "--distill-pretrained", "x"], "distill"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--loss", "clip", "--siglip"], "--siglip together with --loss clip"),
        (["--loss", "sigrel", "--horovod"], "horovod"),
        (["--loss", "sigrel", "--sigrel-init-rel-bias", "nan"], "must be finite"),
        (["--loss", "sigrel", "--sigrel-init-logit-scale", "inf"], "finite and > 0"),
        (["--loss", "sigrel", "--loss-dist-impl", "ring"], "--loss-dist-impl 'ring'"),
        (["--loss", "sigrel", "--sigrel-fixed-logit-scale", "--sigrel-init-logit-scale", "500"], "clamp"),
    ],
)
def test_bad_input_fails_before_any_work(extra, message, capsys):
    base = ["--train-data", "x.tar", "--model", "sigrel-tiny"]
    with pytest.raises(SystemExit) as exc:
        sigrel_train.parse_args(base + extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_non_finite_loss_stops_with_step_and_values():
    args = sigrel_train.parse_args(["--train-data", "x.tar", "--model", "sigrel-tiny", "--loss", "sigrel"])
    args.rank, args.world_size = 0, 1  # set by open_clip's main
    run = common.SigrelRun(args)
    run.start_epoch(3, 10 * args.accum_freq)
    monitor = common.LossMonitor(run.sigrel_loss(), run, open_clip3.is_log_step, report="writer")
    good = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    bad = torch.full((4, 8), math.nan)
    kw = dict(logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-5.0))
    monitor(image_features=good, text_features=good, **kw)  # step 30: the check there passes
    monitor(image_features=bad, text_features=bad, **kw)  # step 31: no host read, no error yet
    for _ in range(7):
        monitor(image_features=good, text_features=good, **kw)  # steps 32-38: not checked
    with pytest.raises(FloatingPointError, match=r"step 31 \(epoch 3, batch 1 .*t = 10, b_rel = 0.5"):
        monitor(image_features=good, text_features=good, **kw)  # step 39, the epoch's last: checked


def test_geometry_hook_works_under_open_clips_inference_mode():
    args = sigrel_train.parse_args(["--train-data", "x.tar", "--model", "sigrel-tiny", "--sigrel-geometry", "full"])
    run = common.SigrelRun(args)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=-1)  # not separable by centroids

    def stock(image_features, text_features, logit_scale):
        return {"image_to_text_R@1": 0.5}

    with torch.inference_mode():
        metrics = run.get_clip_metrics(stock, image_features=x, text_features=y, logit_scale=torch.tensor(10.0))
    assert metrics["image_to_text_R@1"] == 0.5  # open_clip's own values are kept
    assert 0.5 <= metrics["linear_separability"] <= 1.0 and "margin_trimmed" in metrics


def test_no_loss_flag_is_plain_open_clip():
    args = sigrel_train.parse_args(["--train-data", "x.tar", "--model", "sigrel-tiny"])
    assert args.loss is None and not args.siglip
    import open_clip

    args.distill, args.rank, args.world_size = False, 0, 1  # set by open_clip's main before create_loss
    if hasattr(open_clip, "create_task"):  # 4.x: open_clip's own task
        from open_clip_sigrel.hosts import open_clip4

        model = open_clip.create_model("sigrel-tiny")
        task = open_clip4.create_task(common.SigrelRun(args), open_clip.create_task, args, model)
        assert type(task).__name__ == "CLIPTask" and type(task.loss.loss).__name__ == "ClipLoss"
    else:
        loss = open_clip3.create_loss(common.SigrelRun(args), open_clip.create_loss, args)
        assert type(loss.loss).__name__ == "ClipLoss"


def test_help_lists_plugin_and_open_clip_flags(python):
    out = subprocess.run([python, "-m", "open_clip_sigrel.cli.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--sigrel-fixed-rel-bias" in out.stdout and "--train-data" in out.stdout


NAN_ON_RANK_1 = textwrap.dedent("""
    import os, sys
    from open_clip_sigrel import loss
    forward, calls = loss.SigRelLoss.forward, [0]

    def poisoned(self, *a, **kw):  # rank 1's third loss is NaN; rank 0 never sees one of its own
        out = forward(self, *a, **kw)
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == 3:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    loss.SigRelLoss.forward = poisoned
    from open_clip_sigrel.cli.train import main
    sys.exit(main(sys.argv[1:]))
""")


def test_nan_on_one_rank_stops_both_ranks_promptly(digits_data, tmp_path, python):
    import time

    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    argv = _argv(digits_data, tmp_path, "nan", "--loss", "sigrel", "--log-every-n-steps", "100", epochs=3, val=False)
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "--", *argv]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)  # a hang fails here
    elapsed = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode != 0
    # Both ranks stop at the same check (step 10, CHECK_EVERY) naming rank 1's step and values.
    assert out.count("FloatingPointError: non-finite loss at step 2 ") == 2, out[-4000:]
    # rank 1's t and b_rel at its bad step (t and b_rel near their start, 10 and 1, after 2 steps)
    num = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
    m = re.search(rf"at step 2 .*: t = {num}, b_rel = {num}, logit_bias = {num}\.", out)
    assert m, out[-4000:]
    t, b, bias = map(float, m.groups())
    assert t == pytest.approx(10, rel=0.02) and b == pytest.approx(1, rel=0.02) and bias == pytest.approx(-t * b, rel=1e-4)
    assert not (tmp_path / "nan" / "checkpoints" / "epoch_1.pt").exists()  # stopped within the first epoch
    assert elapsed < 120, elapsed


def test_clip_run_logs_no_relative_bias(digits_data, tmp_path):
    """A model without logit_bias has no b_rel: no train/rel_bias, no NaN in the (strict) JSON."""
    import open_clip

    cfg = json.loads((Path(sigrel_train.__file__).parents[1] / "configs" / "sigrel-tiny.json").read_text())
    cfg["model_cfg"].pop("init_logit_bias")
    (tmp_path / "tiny-nobias.json").write_text(json.dumps(cfg["model_cfg"]))
    open_clip.add_model_config(tmp_path / "tiny-nobias.json")
    argv = _argv(digits_data, tmp_path, "clip", epochs=1, val=False)
    argv[argv.index("sigrel-tiny")] = "tiny-nobias"
    assert sigrel_train.main(argv) == 0

    def no_nan(token):
        raise AssertionError(f"non-JSON constant {token} in the telemetry")

    lines = (tmp_path / "clip" / telemetry.TELEMETRY_FILE).read_text().splitlines()
    records = [json.loads(line, parse_constant=no_nan) for line in lines]
    assert len(records) == 16 and all("rel_bias" not in r and "logit_bias" not in r for r in records)
    assert all(math.isfinite(r["batch_margin_mean"]) for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "clip" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "train/batch_margin_mean" in tags and "train/rel_bias" not in tags

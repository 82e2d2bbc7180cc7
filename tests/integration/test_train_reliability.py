"""The training entry on bad data, interrupted checkpoints, frozen scalars, mismatched resumes and bad
numbers: each stops before work with a clear error (exit 2), or goes on as documented."""
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from open_clip_sigrel.cli import train as sigrel_train
from open_clip_sigrel.hosts import checkpoint, common, data_guard
from open_clip_sigrel.hosts.options import SIGREL_ONLY_FLAGS


def _argv(data, logs, name, *extra, epochs=1, train_data=None):
    return [
        "--model", "sigrel-tiny", "--train-data", train_data or data["train_data"],
        "--train-num-samples", str(data["train_num_samples"]), "--dataset-type", "webdataset",
        "--batch-size", "32", "--workers", "0", "--lr", "2e-3", "--warmup", "2", "--epochs", str(epochs),
        "--log-every-n-steps", "4", "--logs", str(logs), "--name", name, "--device", "cpu", "--seed", "0",
        *extra,
    ]


def _fails_before_work(argv, capsys, *needles):
    """main(argv) exits 2 with every needle in its error line, and writes no run folder."""
    with pytest.raises(SystemExit) as exc:
        sigrel_train.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shards(data):
    return sorted(Path(data["train_data"]).parent.glob("*.tar"))


# -- 1. bad training data


def _bad_shards(tmp_path, good):
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2 + 100])
    rnd = tmp_path / "random.tar"
    rnd.write_bytes(os.urandom(4096))
    (tmp_path / "zero.tar").write_bytes(b"")
    return {
        "missing": (str(tmp_path / "missing" / "{0..1}.tar"), "does not exist"),
        "zero": (str(tmp_path / "zero.tar"), "is empty (0 bytes)"),
        "random": (str(rnd), "not a complete tar"),
        "empty": (str(_tar(tmp_path / "empty.tar", [])), "holds no files"),
        "imageless": (str(_tar(tmp_path / "imageless.tar", [("a.txt", b"x"), ("b.txt", b"y")])), "no sample with both"),
        "truncated": (str(truncated), "not a complete tar"),
    }


@pytest.mark.parametrize("case", ["missing", "zero", "random", "empty", "imageless", "truncated"])
def test_bad_shard_stops_before_work_naming_it(digits_data, tmp_path, capsys, case):
    urls, problem = _bad_shards(tmp_path, _shards(digits_data)[0])[case]
    shard = urls.replace("{0..1}", "0")
    err = _fails_before_work(_argv(digits_data, tmp_path / "logs", "bad", "--loss", "sigrel", train_data=urls),
                             capsys, shard, problem)
    assert len(err) < 2000  # one line, no flood
    assert not (tmp_path / "logs" / "bad").exists()


@pytest.mark.parametrize("case", ["missing", "no column", "no image"])
def test_bad_csv_stops_before_work_naming_it(digits_data, tmp_path, capsys, case):
    good = Path(digits_data["train_csv"]).read_text().splitlines()
    path = tmp_path / "train.csv"
    if case == "no column":
        path.write_text("\n".join([good[0].replace("title", "caption"), *good[1:]]) + "\n")
        problem = "has no column 'title'"
    elif case == "no image":
        first = good[1].split("\t")
        path.write_text("\n".join([good[0], "\t".join([str(tmp_path / "gone.png"), *first[1:]]), *good[2:]]) + "\n")
        problem = f"names image files that do not exist, e.g. {tmp_path / 'gone.png'}"
    else:
        problem = "does not exist"
    argv = _argv(digits_data, tmp_path / "logs", "csv", "--loss", "sigrel", train_data=str(path))
    argv[argv.index("webdataset")] = "csv"
    _fails_before_work(argv, capsys, f"CSV {path}", problem)


def test_good_csv_passes_the_check(digits_data):
    args = sigrel_train.parse_args(["--train-data", digits_data["train_csv"], "--dataset-type", "csv",
                                    "--csv-img-key", "filepath", "--csv-caption-key", "title"])
    data_guard.check_shards(args)


def _with_corrupt_sample(tmp_path, good):
    """A copy of a good shard with one more sample whose jpg cannot be decoded."""
    out = tmp_path / "corrupt.tar"
    shutil.copy(good, out)
    with tarfile.open(out, "a") as tar:
        for name, data in (("zzbad.jpg", b"\xff\xd8 not a jpeg"), ("zzbad.txt", b"a broken sample")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _train_subprocess(python, argv, timeout=420):
    code = "import sys; from open_clip_sigrel.cli.train import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([python, "-c", code, *argv], capture_output=True, text=True, timeout=timeout)


def test_corrupt_sample_stops_the_run_or_is_skipped_within_the_tolerance(digits_data, tmp_path, python):
    shard = _with_corrupt_sample(tmp_path, _shards(digits_data)[0])
    base = _argv(digits_data, tmp_path / "logs", "x", "--loss", "sigrel", "--train-num-samples", "128",
                 train_data=str(shard))
    stopped = _train_subprocess(python, [*base[:-2], "--name", "stop"])  # a hang fails by the timeout
    assert stopped.returncode != 0
    assert "bad training sample" in stopped.stderr and "--sigrel-max-bad-samples 0" in stopped.stderr
    assert "Handling webdataset error" not in stopped.stderr
    skipped = _train_subprocess(python, [*base[:-2], "--name", "skip", "--sigrel-max-bad-samples", "50"])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipping bad sample 1 of at most 50" in skipped.stderr


def test_sample_guard_counts_then_raises():
    guard = data_guard.SampleGuard(2)
    assert guard(ValueError("a")) and guard(ValueError("b"))
    with pytest.raises(RuntimeError, match="2 sample\\(s\\) skipped"):
        guard(ValueError("c", "/data/shard-3.tar"))


# -- 2. checkpoints


def test_atomic_save_survives_a_kill_mid_write(tmp_path, python):
    """SIGKILL while torch.save writes a large checkpoint over a complete one: the old one stays whole."""
    path = tmp_path / "epoch_2.pt"
    checkpoint.atomic_save({"state_dict": {"w": torch.ones(3)}}, path)
    script = textwrap.dedent(f"""
        import torch
        from open_clip_sigrel.hosts.checkpoint import atomic_save
        print("writing", flush=True)
        atomic_save({{"state_dict": {{"w": torch.randn(150_000_000)}}}}, {str(path)!r})
    """)
    proc = subprocess.Popen([python, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    partial = None
    for _ in range(400):  # wait until the temporary file is being written, then kill
        partial = next(tmp_path.glob("epoch_2.pt.partial-*"), None)
        if partial is not None and partial.stat().st_size > 0:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert partial is not None
    assert checkpoint.incomplete(str(path)) is None
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert checkpoint.incomplete(str(partial)) is not None  # what was cut off is not a checkpoint ...
    assert checkpoint.latest_complete_checkpoint(None, str(tmp_path) + "/", False) == str(path)  # ... nor picked


SLOW_SAVE = textwrap.dedent("""
    # rank 0 holds its epoch-2 checkpoint half-written (the bytes out, not yet renamed) long enough to be killed
    import os, sys, time, torch
    save = torch.save

    def slow_save(obj, f, *a, **kw):
        save(obj, f, *a, **kw)
        if "epoch_2.pt.partial-" in getattr(f, "name", ""):
            f.flush()
            time.sleep(120)

    torch.save = slow_save
    from open_clip_sigrel.cli.train import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_of_rank_0_during_a_save_leaves_a_resumable_run(digits_data, tmp_path, python):
    """SIGKILL of rank 0 of a 2-rank run while it writes epoch_2.pt: epoch_1.pt stays whole, no epoch_2.pt
    appears, and --resume latest continues from epoch 1."""
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE)
    argv = _argv(digits_data, tmp_path, "killed", "--loss", "sigrel", "--train-num-samples", "128", epochs=3)
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), "--", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        partial = None
        while partial is None and time.monotonic() < deadline and proc.poll() is None:
            partial = next(ckpts.glob("epoch_2.pt.partial-*"), None)
            time.sleep(0.2)
        assert partial is not None, "rank 0 never started writing epoch_2.pt"
        os.kill(int(partial.name.rsplit("-", 1)[1]), signal.SIGKILL)  # the writer's pid is in the name
        proc.wait(timeout=120)  # torchrun stops the other rank too
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not (ckpts / "epoch_2.pt").exists()
    assert checkpoint.incomplete(str(ckpts / "epoch_1.pt")) is None
    resumed = _argv(digits_data, tmp_path, "killed", "--loss", "sigrel", "--train-num-samples", "128",
                    "--resume", "latest", epochs=2)
    assert sigrel_train.main(resumed) == 0
    assert torch.load(ckpts / "epoch_2.pt", map_location="cpu", weights_only=True)["epoch"] == 2


@pytest.fixture(scope="module")
def trained(digits_data, tmp_path_factory):
    """A 2-epoch --loss sigrel run with a checkpoint per epoch."""
    logs = tmp_path_factory.mktemp("logs")
    assert sigrel_train.main(_argv(digits_data, logs, "run", "--loss", "sigrel", epochs=2)) == 0
    return logs / "run" / "checkpoints"


def test_checkpoints_carry_the_setup_their_optimizer_state_belongs_to(trained):
    ckpt = torch.load(trained / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert ckpt["sigrel"] == {"loss": "sigrel", "fixed_rel_bias": False, "fixed_logit_scale": False}
    assert not list(trained.glob("*.partial-*"))


def test_resume_latest_skips_a_truncated_newest_checkpoint(digits_data, trained, tmp_path, caplog):
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(trained, ckpts)
    (ckpts / "epoch_2.pt").write_bytes(b"")  # what a kill during a plain torch.save leaves
    with caplog.at_level("WARNING", logger="open_clip_sigrel"):
        assert sigrel_train.main(_argv(digits_data, tmp_path, "run", "--loss", "sigrel", "--resume", "latest",
                                       epochs=2)) == 0
    assert f"skipping {ckpts / 'epoch_2.pt'}" in caplog.text
    assert checkpoint.incomplete(str(ckpts / "epoch_2.pt")) is None  # epoch 2 trained again from epoch 1


@pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
def test_truncated_checkpoint_given_explicitly_is_an_error_naming_it(digits_data, trained, tmp_path, capsys, flag):
    cut = tmp_path / "epoch_1.pt"
    data = (trained / "epoch_1.pt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _fails_before_work(_argv(digits_data, tmp_path, "x", "--loss", "sigrel", flag, str(cut)), capsys,
                       f"{flag} {cut}", "truncated")


# -- 3. frozen and clamped t


def _checkpoint_with_t(path, t):
    import open_clip

    from open_clip_sigrel.configs import register_shipped_configs

    register_shipped_configs()
    model = open_clip.create_model("sigrel-tiny", init_logit_bias=-12.9)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(t))
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("extra", [["--sigrel-fixed-logit-scale"], ["--sigrel-fixed-logit-scale", "--sigrel-fixed-rel-bias"]])
def test_fixed_t_from_a_checkpoint_above_the_clamp_is_an_error(digits_data, tmp_path, capsys, extra):
    ckpt = _checkpoint_with_t(tmp_path / "siglip.pt", 117.8)
    _fails_before_work(_argv(digits_data, tmp_path, "x", "--loss", "sigrel", "--pretrained", ckpt, *extra), capsys,
                       "fixed t = 117.8", "from the pretrained checkpoint", "--sigrel-max-logit-scale")


def test_fixed_t_above_the_default_clamp_stays_fixed_when_the_clamp_is_lifted(digits_data, tmp_path):
    ckpt = _checkpoint_with_t(tmp_path / "siglip.pt", 117.8)
    argv = _argv(digits_data, tmp_path, "lifted", "--loss", "sigrel", "--pretrained", ckpt,
                 "--sigrel-fixed-logit-scale", "--sigrel-max-logit-scale", "inf", "--train-num-samples", "128")
    assert sigrel_train.main(argv) == 0
    sd = torch.load(tmp_path / "lifted" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    assert sd["logit_scale"].exp().item() == pytest.approx(117.8, rel=1e-5)


@pytest.mark.parametrize("t0", ["500", "0.5"])
def test_trainable_t_outside_the_clamp_is_an_error(digits_data, tmp_path, capsys, t0):
    _fails_before_work(_argv(digits_data, tmp_path, "x", "--loss", "sigrel", "--sigrel-init-logit-scale", t0),
                       capsys, "outside the clamp [1, 100]")


# -- 4. sigrel flags with another loss


@pytest.mark.parametrize("loss", [["--siglip"], ["--loss", "siglip"], ["--loss", "clip"], []])
@pytest.mark.parametrize("flag", sorted(SIGREL_ONLY_FLAGS))
def test_sigrel_flags_with_another_loss_are_an_error(digits_data, tmp_path, capsys, loss, flag):
    value = {"sigrel_normalize": ["pairs"], "sigrel_chunk_size": ["64"], "sigrel_init_rel_bias": ["0.3"],
             "sigrel_init_logit_scale": ["20"]}.get(flag, [])
    name = "--" + flag.replace("_", "-")
    err = _fails_before_work(_argv(digits_data, tmp_path, "x", *loss, name, *value), capsys, name,
                             "only acts with --loss sigrel")
    assert ("siglip" if loss and "clip" not in loss else "clip") in err


# -- 5. resume across losses and freeze flags


@pytest.mark.parametrize("extra", [["--loss", "sigrel", "--sigrel-fixed-rel-bias"],
                                   ["--loss", "sigrel", "--sigrel-fixed-logit-scale"],
                                   ["--loss", "siglip"], ["--loss", "clip"]])
def test_resume_with_another_setup_is_an_error_that_says_what_to_do(digits_data, trained, tmp_path, capsys, extra):
    ckpt = str(trained / "epoch_1.pt")
    _fails_before_work(_argv(digits_data, tmp_path, "x", *extra, "--resume", ckpt), capsys,
                       "optimizer state was built for loss = sigrel", f"--pretrained {ckpt}")


def test_resume_of_a_stock_training_checkpoint_under_sigrel_is_an_error(digits_data, trained, tmp_path, capsys):
    ckpt = torch.load(trained / "epoch_1.pt", map_location="cpu", weights_only=True)
    del ckpt["sigrel"]  # what stock open_clip writes (e.g. a --siglip run)
    torch.save(ckpt, tmp_path / "stock.pt")
    _fails_before_work(_argv(digits_data, tmp_path, "x", "--loss", "sigrel", "--resume", str(tmp_path / "stock.pt")),
                       capsys, "no record of its loss")


def test_resume_with_the_same_setup_and_pretrained_with_another_work(digits_data, trained, tmp_path):
    ckpt = str(trained / "epoch_1.pt")
    fine_tune = _argv(digits_data, tmp_path, "ft", "--loss", "sigrel", "--sigrel-fixed-rel-bias", "--pretrained", ckpt,
                      "--train-num-samples", "64")
    assert sigrel_train.main(fine_tune) == 0
    args = sigrel_train.parse_args(_argv(digits_data, tmp_path, "same", "--loss", "sigrel", "--resume", ckpt))
    checkpoint.check_resume(args)  # the same setup: no error


# -- 6. stock open_clip loads checkpoints of configs without init_logit_bias


def test_stock_config_without_bias_loads_with_the_documented_call(tmp_path, python, caplog):
    import open_clip

    from open_clip_sigrel.model import sigrel_values

    args = sigrel_train.parse_args(["--train-data", "x.tar", "--model", "ViT-S-32", "--loss", "sigrel",
                                    "--sigrel-init-rel-bias", "0.4"])
    with caplog.at_level("WARNING", logger="open_clip_sigrel"):
        model, _, _ = common.SigrelRun(args).create_model_and_transforms(
            open_clip.create_model_and_transforms, "ViT-S-32", None, output_dict=True)
    assert "init_logit_bias=0.0" in caplog.text
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    want = sigrel_values(model)["logit_bias"]
    load = textwrap.dedent("""
        import sys, open_clip
        try:
            open_clip.create_model("ViT-S-32", pretrained=sys.argv[1])
            print("plain call loads")
        except AttributeError:
            print("plain call fails")
        model = open_clip.create_model("ViT-S-32", pretrained=sys.argv[1], init_logit_bias=0.0)
        assert not any(m.startswith("open_clip_sigrel") for m in sys.modules)
        print(float(model.logit_bias), float(model.logit_scale.exp()))
    """)
    out = subprocess.run([python, "-c", load, str(tmp_path / "ckpt.pt")], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "plain call fails"  # why the documented keyword is needed
    bias, t = map(float, lines[1].split())
    assert bias == pytest.approx(want, rel=1e-6) and bias == pytest.approx(-10.0 * 0.4, rel=1e-5)
    assert t == pytest.approx(10.0, rel=1e-5)


# -- 9. numbers in the dtype they are used in


NUMERIC = {
    "--sigrel-init-logit-scale": ["nan", "inf", "-inf", "0", "-1", "1e-300", "1e40", "1e300"],
    "--sigrel-init-rel-bias": ["nan", "inf", "-inf", "1e300", "1e38", "1e39"],
    "--sigrel-max-logit-scale": ["nan", "-inf", "0", "-1", "0.5", "1e40"],
    "--sigrel-chunk-size": ["0", "-2"],
    "--sigrel-max-bad-samples": ["-1"],
    "--accum-freq": ["0", "-1"],
}


@pytest.mark.parametrize("flag,value", [(f, v) for f, vs in NUMERIC.items() for v in vs])
def test_numeric_flags_fuzz(digits_data, tmp_path, capsys, flag, value):
    argv = _argv(digits_data, tmp_path / "logs", "fuzz", "--loss", "sigrel", flag, value)
    err = _fails_before_work(argv, capsys)
    assert flag in err or "logit_bias" in err or "clamp" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "logs").exists()


def test_huge_rel_bias_whose_logit_bias_overflows_float32(digits_data, tmp_path, capsys):
    # both finite in float32, their product -t * b_rel is not
    _fails_before_work(_argv(digits_data, tmp_path, "x", "--loss", "sigrel", "--sigrel-init-rel-bias", "1e38"),
                       capsys, "logit_bias", "float32")


if sys.platform != "linux":  # the kill test needs POSIX signals
    pytestmark = pytest.mark.skip(reason="POSIX only")

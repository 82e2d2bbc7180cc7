"""The training recipes cannot rot: every script's training arguments go through the plugin's parser.

Each recipe builds its arguments in a bash array and, with ``SIGREL_RECIPE_DRY_RUN=args``, prints
them NUL-separated instead of launching; ``=1`` prints the whole launcher command. The arguments are
exactly what bash would pass (defaults, environment overrides and brace placeholders included), and
``open_clip_sigrel.train.parse_args`` runs open_clip's own parser plus the plugin's checks on them.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from open_clip_sigrel.train import parse_args

RECIPES = Path(__file__).resolve().parents[1] / "training_recipes"
# (sigrel recipe, its --siglip A/B partner, environment variable of its training shards, launcher)
PAIRS = [
    ("cc3m_sigrel_8gpu.sh", "cc3m_siglip_8gpu.sh", "CC3M_TRAIN", "torchrun"),
    ("cc12m_sigrel_8gpu.sh", "cc12m_siglip_8gpu.sh", "CC12M_TRAIN", "torchrun"),
    ("laion_sigrel_slurm.sh", "laion_siglip_slurm.sh", "LAION_TRAIN", "srun"),
]
SCRIPTS = [s for pair in PAIRS for s in pair[:2]]
LAUNCHER = {s: pair[3] for pair in PAIRS for s in pair[:2]}
TRAIN_VAR = {s: pair[2] for pair in PAIRS for s in pair[:2]}
# Flags that select the loss (with the number of values each takes): all a pair may differ in.
LOSS_FLAGS = {"--siglip": 0, "--loss": 1, "--sigrel-init-logit-scale": 1, "--sigrel-init-rel-bias": 1,
              "--sigrel-fixed-rel-bias": 0, "--sigrel-fixed-logit-scale": 0, "--sigrel-normalize": 1,
              "--sigrel-chunk-size": 1}

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is needed to read the recipes")


def _env(**overrides: str) -> dict[str, str]:
    """A clean environment: nothing the recipes read leaks in from the caller's shell."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(overrides)
    return env


def recipe_args(script: str, **env: str) -> list[str]:
    """The training arguments the recipe would pass to open_clip_sigrel.train."""
    out = subprocess.run([BASH, str(RECIPES / script)], env=_env(SIGREL_RECIPE_DRY_RUN="args", **env),
                         capture_output=True, check=True, timeout=60)
    text = out.stdout.decode()
    assert text.endswith("\0"), f"{script}: expected NUL-terminated arguments, got {text!r}"
    return text[:-1].split("\0")


def _parse(script: str, argv: list[str]):
    try:
        return parse_args(argv)
    except SystemExit as e:  # argparse / the plugin's checks exit instead of raising
        pytest.fail(f"{script}: the plugin's parser rejected the recipe's arguments (exit {e.code}): {argv}")


def _strip(argv: list[str], flags: dict[str, int]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 1 + flags[argv[i]]
        else:
            out.append(argv[i])
            i += 1
    return out


def test_every_recipe_is_covered():
    on_disk = {p.name for p in RECIPES.glob("*.sh")}
    assert on_disk == set(SCRIPTS), "add new recipes (with their A/B partner) to PAIRS"
    assert (RECIPES / "README.md").is_file()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax_and_executable(script):
    subprocess.run([BASH, "-n", str(RECIPES / script)], check=True, timeout=60)
    assert os.access(RECIPES / script, os.X_OK), f"{script} is not executable"
    assert (RECIPES / script).read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_recipe_parses_with_key_values(script):
    argv = recipe_args(script)
    args = _parse(script, argv)
    assert args.model == "ViT-B-16-sigrel"
    assert args.loss_dist_impl == "bidir"
    assert args.precision == "amp_bf16"
    assert args.dataset_type == "webdataset"
    assert args.sigrel_max_logit_scale == 1000.0  # lifted in both runs of a pair: t may keep growing
    assert args.val_data and args.val_num_samples and args.val_frequency == 1  # geometry metrics get logged
    assert args.train_num_samples > 0 and args.batch_size > 0 and args.epochs > 0 and args.warmup > 0
    assert args.report_to == "tensorboard" and args.resume == "latest" and args.save_frequency == 1
    # The brace placeholder survived bash (a `}` inside ${VAR:-...} would cut it short).
    assert args.train_data.endswith("}.tar") and "{" in args.train_data
    if "sigrel" in script:
        assert args.loss == "sigrel" and not args.siglip
        assert args.sigrel_init_logit_scale == 10.0 and args.sigrel_init_rel_bias == 1.0
        assert not args.sigrel_fixed_rel_bias and not args.sigrel_fixed_logit_scale
    else:
        assert args.siglip and args.loss in (None, "siglip")
    if LAUNCHER[script] == "srun":
        assert args.dataset_resampled and args.grad_checkpointing


@pytest.mark.parametrize("sigrel,siglip", [p[:2] for p in PAIRS])
def test_pair_differs_only_in_loss_flags(sigrel, siglip):
    a, b = recipe_args(sigrel), recipe_args(siglip)
    assert "--siglip" in b and "--siglip" not in a
    assert a[a.index("--loss") + 1] == "sigrel" and "--loss" not in b
    common = dict(LOSS_FLAGS, **{"--name": 1})
    assert _strip(a, common) == _strip(b, common)
    name_a, name_b = a[a.index("--name") + 1], b[b.index("--name") + 1]
    assert name_a != name_b, "with --resume latest, equal names would resume each other's checkpoints"
    # The scripts differ only in their comments, the LOSS_ARGS / NAME lines and the SLURM job name.
    text_a, text_b = ((RECIPES / s).read_text().splitlines() for s in (sigrel, siglip))
    code = [(x, y) for x, y in zip(text_a, text_b)
            if x != y and not (x.startswith("#") and y.startswith("#"))]
    assert len(text_a) == len(text_b)
    assert [x.split("=")[0] for x, _ in code] == ["LOSS_ARGS", "NAME"], code


@pytest.mark.parametrize("script", SCRIPTS)
def test_environment_overrides_reach_the_arguments(script):
    env = {TRAIN_VAR[script]: "/mnt/shards/train-{000..009}.tar", "BATCH_SIZE": "64", "EPOCHS": "3",
           "LR": "2e-4", "LOGS": "/mnt/logs", "NAME": "my-run", "MAX_LOGIT_SCALE": "inf",
           "IMAGENET_VAL": "/mnt/imagenet/val"}
    args = _parse(script, recipe_args(script, **env))
    assert args.train_data == "/mnt/shards/train-{000..009}.tar"
    assert (args.batch_size, args.epochs, args.lr) == (64, 3, 2e-4)
    assert (args.logs, args.name) == ("/mnt/logs", "my-run")
    assert args.sigrel_max_logit_scale == float("inf")
    assert args.imagenet_val == "/mnt/imagenet/val" and args.zeroshot_frequency == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_the_launcher_with_the_same_arguments(script):
    out = subprocess.run([BASH, str(RECIPES / script)], env=_env(SIGREL_RECIPE_DRY_RUN="1"),
                         capture_output=True, text=True, check=True, timeout=60).stdout
    cmd = shlex.split(out)
    assert cmd[0] == LAUNCHER[script]
    module = cmd.index("open_clip_sigrel.train")
    assert cmd[module - 1] == "-m"
    assert cmd[module + 1:] == recipe_args(script)
    if LAUNCHER[script] == "torchrun":
        assert cmd[cmd.index("--nproc_per_node") + 1] == "8"


@pytest.mark.parametrize("script", [s for s in SCRIPTS if LAUNCHER[s] == "srun"])
def test_sbatch_directives_come_before_any_command(script):
    """sbatch stops reading #SBATCH lines at the first command."""
    lines = (RECIPES / script).read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(not line.strip() or line.startswith("#") for line in lines[:last])
    directives = {line.split()[1].split("=")[0] for line in lines if line.startswith("#SBATCH")}
    assert {"--nodes", "--ntasks-per-node", "--gres"} <= directives

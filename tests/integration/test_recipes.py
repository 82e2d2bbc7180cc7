"""The training recipes cannot rot: every recipe x loss argument set goes through the plugin's parser.

One recipe per dataset, the loss an environment variable (``LOSS=sigrel``, the default, or ``LOSS=siglip``):
the two runs of an A/B pair come from the same script, and the flags they differ in are written once, in
``training_recipes/_common.sh``. Each recipe builds its arguments in a bash array and, with
``SIGREL_RECIPE_DRY_RUN=args``, prints them NUL-separated instead of launching; ``=1`` prints the whole
launcher command. The arguments are exactly what bash would pass (defaults, environment overrides and brace
placeholders included), and ``open_clip_sigrel.cli.train.parse_args`` runs open_clip's own parser plus the
plugin's checks on them.

The whole launcher line goes through its launcher's parser too (torchrun's own argparse parser; an explicit
parse of srun's and python's few options), since a launcher that swallows a training flag (torchrun reads
``--logs`` as a prefix of its ``--logs-specs``) never starts the run; the SLURM recipe is also run the way
sbatch runs it (a copy in a spool folder, with stand-ins for scontrol and srun); and the cc3m recipe's argument
sets, shrunk to CPU sizes, really train under torchrun with two processes, once per loss.
"""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from open_clip_sigrel.cli.train import parse_args

RECIPES = Path(__file__).resolve().parents[2] / "training_recipes"
COMMON = "_common.sh"  # sourced by every recipe; not a recipe itself
# recipe -> (environment variable of its training shards, launcher, default run name without the loss)
RECIPE = {
    "cc3m_8gpu.sh": ("CC3M_TRAIN", "torchrun", "cc3m-vitb16"),
    "cc12m_8gpu.sh": ("CC12M_TRAIN", "torchrun", "cc12m-vitb16"),
    "laion_slurm.sh": ("LAION_TRAIN", "srun", "laion400m-vitb16"),
}
SCRIPTS = list(RECIPE)
LOSSES = ("sigrel", "siglip")
CASES = [(script, loss) for script in SCRIPTS for loss in LOSSES]
TORCHRUN_CASES = [(s, loss) for s, loss in CASES if RECIPE[s][1] == "torchrun"]
# Flags that select the loss (with the number of values each takes): all a pair may differ in, besides --name.
LOSS_FLAGS = {"--siglip": 0, "--loss": 1, "--sigrel-init-logit-scale": 1, "--sigrel-init-rel-bias": 1,
              "--sigrel-fixed-rel-bias": 0, "--sigrel-fixed-logit-scale": 0, "--sigrel-normalize": 1,
              "--sigrel-chunk-size": 1}
# Their settings in the parsed namespace, with what the plugin's checks derive from them for --loss sigrel.
LOSS_KEYS = {"siglip", "loss", "sigrel_init_logit_scale", "sigrel_init_rel_bias", "sigrel_fixed_rel_bias",
             "sigrel_fixed_logit_scale", "sigrel_normalize", "sigrel_chunk_size", "sigrel_explicit_init"}

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is needed to read the recipes")


def _env(**overrides: str) -> dict[str, str]:
    """A clean environment: nothing the recipes read leaks in from the caller's shell."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(overrides)
    return env


def _loss_env(loss: str | None, env: dict[str, str]) -> dict[str, str]:
    return dict(env) if loss is None else dict(env, LOSS=loss)


def recipe_args(script: str, loss: str | None, **env: str) -> list[str]:
    """The training arguments the recipe would pass to open_clip_sigrel.cli.train (loss None: LOSS unset)."""
    out = subprocess.run([BASH, str(RECIPES / script)], env=_env(SIGREL_RECIPE_DRY_RUN="args", **_loss_env(loss, env)),
                         capture_output=True, check=True, timeout=60)
    text = out.stdout.decode()
    assert text.endswith("\0"), f"{script}: expected NUL-terminated arguments, got {text!r}"
    return text[:-1].split("\0")


def launcher_line(script: str, loss: str, **env: str) -> list[str]:
    """The full command the recipe would exec (its ``printf %q`` dry run, split as bash would)."""
    out = subprocess.run([BASH, str(RECIPES / script)], env=_env(SIGREL_RECIPE_DRY_RUN="1", **_loss_env(loss, env)),
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return shlex.split(out)


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


def _code_lines(path: Path) -> list[str]:
    """The script's lines without comments (a trailing `# ...` after code included) and blank lines."""
    lines = []
    for line in path.read_text().splitlines():
        code = line.split(" # ")[0].split("  #")[0].strip()
        if code and not code.startswith("#"):
            lines.append(code)
    return lines


def test_every_recipe_is_covered():
    on_disk = {p.name for p in RECIPES.glob("*.sh")}
    assert on_disk - {COMMON} == set(SCRIPTS), "add new recipes to RECIPE"
    assert (RECIPES / COMMON).is_file() and (RECIPES / "README.md").is_file()


@pytest.mark.parametrize("script", [*SCRIPTS, COMMON])
def test_bash_syntax_and_executable(script):
    subprocess.run([BASH, "-n", str(RECIPES / script)], check=True, timeout=60)
    if script != COMMON:  # _common.sh is only sourced
        assert os.access(RECIPES / script, os.X_OK), f"{script} is not executable"
        assert (RECIPES / script).read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("script,loss", CASES)
def test_recipe_parses_with_key_values(script, loss):
    argv = recipe_args(script, loss)
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
    assert args.name == f"{RECIPE[script][2]}-{loss}"  # the run name carries the loss
    if loss == "sigrel":
        assert args.loss == "sigrel" and not args.siglip
        assert args.sigrel_init_logit_scale == 10.0 and args.sigrel_init_rel_bias == 1.0
        assert not args.sigrel_fixed_rel_bias and not args.sigrel_fixed_logit_scale
    else:
        assert args.siglip and args.loss in (None, "siglip")
    if RECIPE[script][1] == "srun":
        assert args.dataset_resampled and args.grad_checkpointing
        assert args.beta2 == 0.95
    else:
        assert not args.dataset_resampled and not args.grad_checkpointing and args.beta2 == 0.98


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_default_loss_is_sigrel(script):
    assert recipe_args(script, None) == recipe_args(script, "sigrel")


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_loss_is_refused_before_anything_runs(script):
    out = subprocess.run([BASH, str(RECIPES / script)], env=_env(LOSS="clip", SIGREL_RECIPE_DRY_RUN="1"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert f"{script}: LOSS=clip: expected sigrel or siglip" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_pair_differs_only_in_loss_settings(script):
    a, b = recipe_args(script, "sigrel"), recipe_args(script, "siglip")
    assert "--siglip" in b and "--siglip" not in a
    assert a[a.index("--loss") + 1] == "sigrel" and "--loss" not in b
    common = dict(LOSS_FLAGS, **{"--name": 1})
    assert _strip(a, common) == _strip(b, common)
    # The parsed namespaces (open_clip's defaults and the plugin's derived settings included) differ in the
    # loss settings and the run name only.
    missing = object()
    ns_a, ns_b = vars(_parse(script, a)), vars(_parse(script, b))
    differ = {k for k in ns_a.keys() | ns_b.keys() if ns_a.get(k, missing) != ns_b.get(k, missing)}
    assert differ - {"name"} <= LOSS_KEYS, sorted(differ - {"name"} - LOSS_KEYS)
    assert {"loss", "siglip", "name"} <= differ
    assert (ns_a["loss"], ns_a["siglip"], ns_b["siglip"]) == ("sigrel", False, True)
    assert ns_a["name"] != ns_b["name"], "with --resume latest, equal names would resume each other's checkpoints"
    assert {k: v for k, v in ns_a.items() if k not in differ} == {k: v for k, v in ns_b.items() if k not in differ}
    # The loss flags are written once, in _common.sh: the recipe's own code never names them.
    code = " ".join(_code_lines(RECIPES / script))
    assert not [f for f in LOSS_FLAGS if f in code.split()], f"{script} sets loss flags itself"


def test_pair_check_catches_a_difference_outside_the_loss():
    """Negative control: a pair whose arguments differ in anything else fails both comparisons."""
    a, b = recipe_args("cc3m_8gpu.sh", "sigrel"), recipe_args("cc3m_8gpu.sh", "siglip")
    b[b.index("--lr") + 1] = "1e-3"
    common = dict(LOSS_FLAGS, **{"--name": 1})
    assert _strip(a, common) != _strip(b, common)
    ns_a, ns_b = vars(_parse("a", a)), vars(_parse("b", b))
    assert {k for k in ns_a if ns_a[k] != ns_b.get(k)} - {"name"} - LOSS_KEYS == {"lr"}


@pytest.mark.parametrize("script,loss", CASES)
def test_environment_overrides_reach_the_arguments(script, loss):
    env = {RECIPE[script][0]: "/mnt/shards/train-{000..009}.tar", "BATCH_SIZE": "64", "EPOCHS": "3",
           "LR": "2e-4", "WD": "0.05", "WARMUP": "7", "BETA2": "0.9", "WORKERS": "3", "VAL_FREQUENCY": "2",
           "LOGS": "/mnt/logs", "NAME": "my-run", "MAX_LOGIT_SCALE": "inf", "IMAGENET_VAL": "/mnt/imagenet/val"}
    args = _parse(script, recipe_args(script, loss, **env))
    assert args.train_data == "/mnt/shards/train-{000..009}.tar"
    assert (args.batch_size, args.epochs, args.lr, args.wd, args.warmup, args.beta2) == (64, 3, 2e-4, 0.05, 7, 0.9)
    assert (args.workers, args.val_frequency) == (3, 2)
    assert (args.logs, args.name) == ("/mnt/logs", "my-run")
    assert args.sigrel_max_logit_scale == float("inf")
    assert args.imagenet_val == "/mnt/imagenet/val" and args.zeroshot_frequency == 2
    assert args.siglip == (loss == "siglip")


@pytest.mark.parametrize("script,loss", CASES)
def test_dry_run_prints_the_launcher_with_the_same_arguments(script, loss):
    cmd = launcher_line(script, loss)
    assert cmd[0] == RECIPE[script][1]
    module = cmd.index("open_clip_sigrel.cli.train")
    assert cmd[module - 1] == "-m"
    if RECIPE[script][1] == "torchrun":  # `--` ends torchrun's own options (see the tests below)
        assert cmd[module + 1] == "--" and cmd[module + 2:] == recipe_args(script, loss)
        assert cmd[cmd.index("--nproc_per_node") + 1] == "8"
    else:
        assert cmd[module + 1:] == recipe_args(script, loss)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if RECIPE[s][1] == "srun"])
def test_sbatch_directives_come_before_any_command(script):
    """sbatch stops reading #SBATCH lines at the first command."""
    lines = (RECIPES / script).read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(not line.strip() or line.startswith("#") for line in lines[:last])
    directives = {line.split()[1].split("=")[0] for line in lines if line.startswith("#SBATCH")}
    assert {"--nodes", "--ntasks-per-node", "--gres"} <= directives


# ---------------------------------------------------------------- the SLURM recipe as sbatch runs it

# Stand-ins for SLURM's commands: scontrol answers the two queries the recipe makes; srun prints the
# environment the tasks would get and its arguments, NUL-separated.
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show job") printf 'JobId=%s JobName=laion-vitb16\\n   Command=%s\\n   WorkDir=%s\\n' "$3" "$FAKE_COMMAND" "$PWD" ;;
  "show hostnames") [[ "$3" == "node-[07-08]" ]] && printf 'node-07\\nnode-08\\n' ;;
  *) exit 1 ;;
esac
"""
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\0' "MASTER_ADDR=$MASTER_ADDR" "MASTER_PORT=$MASTER_PORT" "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" "$@"
"""


def _fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # sbatch runs a copy of the script from slurmd's spool folder, where _common.sh is not.
    spool = tmp_path / "spool" / "job123"
    spool.mkdir(parents=True)
    shutil.copy(RECIPES / "laion_slurm.sh", spool / "slurm_script")
    return spool / "slurm_script"


@pytest.mark.parametrize("command", ["absolute", "relative"])
@pytest.mark.parametrize("loss", LOSSES)
def test_slurm_recipe_runs_from_the_spool_copy(tmp_path, loss, command):
    copy = _fake_slurm(tmp_path)
    # scontrol's Command= is the submitted file; relative to the submission directory when given so.
    submitted = str(RECIPES / "laion_slurm.sh") if command == "absolute" else "training_recipes/laion_slurm.sh"
    env = _env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", LOSS=loss, SLURM_JOB_ID="123",
               SLURM_JOB_NODELIST="node-[07-08]", SLURM_SUBMIT_DIR=str(RECIPES.parent), FAKE_COMMAND=submitted,
               GPUS_PER_NODE="4")
    out = subprocess.run([BASH, str(copy)], env=env, cwd=tmp_path, capture_output=True, check=True, timeout=60)
    got = out.stdout.decode()[:-1].split("\0")  # no dry run: the recipe exec'd (the stand-in) srun
    assert got[:3] == ["MASTER_ADDR=node-07", "MASTER_PORT=12802", "CUDA_VISIBLE_DEVICES=0,1,2,3"]
    srun_opts, argv = srun_training_argv("laion_slurm.sh", ["srun", *got[3:]])
    assert srun_opts == ["--cpu_bind=v", "--accel-bind=gn"]
    assert argv == recipe_args("laion_slurm.sh", loss, GPUS_PER_NODE="4")
    assert _parse("laion_slurm.sh", argv).name == f"laion400m-vitb16-{loss}"


def test_slurm_recipe_without_its_common_file_says_what_to_set(tmp_path):
    copy = _fake_slurm(tmp_path)
    env = _env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="123",
               FAKE_COMMAND=str(tmp_path / "elsewhere" / "laion_slurm.sh"))
    out = subprocess.run([BASH, str(copy)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert "no _common.sh in" in out.stderr and "SIGREL_RECIPES_DIR" in out.stderr
    # ... and with it set, the same copy finds the recipes again.
    env["SIGREL_RECIPES_DIR"], env["SIGREL_RECIPE_DRY_RUN"] = str(RECIPES), "args"
    out = subprocess.run([BASH, str(copy)], env=env, cwd=tmp_path, capture_output=True, check=True, timeout=60)
    assert out.stdout.decode()[:-1].split("\0") == recipe_args("laion_slurm.sh", None)


# ---------------------------------------------------------------- the launcher line, parsed by its launcher

TRAIN_MODULE = "open_clip_sigrel.cli.train"
# Environments the launcher checks run under: the defaults, and every override (IMAGENET_VAL adds flags).
LAUNCH_ENVS = {
    "defaults": {},
    "overrides": {"LOGS": "/mnt/logs", "NAME": "my-run", "BATCH_SIZE": "64", "EPOCHS": "3",
                  "IMAGENET_VAL": "/mnt/imagenet/val", "NPROC_PER_NODE": "4", "GPUS_PER_NODE": "4"},
}


def torchrun_training_argv(script: str, cmd: list[str]):
    """torchrun's own parser on the launcher line; returns its args and what the module receives."""
    from torch.distributed.run import get_args_parser

    assert cmd[0] == "torchrun", cmd
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = get_args_parser().parse_args(cmd[1:])
    except SystemExit as e:
        pytest.fail(f"{script}: torchrun's parser rejected the launcher line (exit {e.code}): "
                    f"{err.getvalue().strip()}\n{shlex.join(cmd)}")
    assert args.module and args.training_script == TRAIN_MODULE, (args.module, args.training_script)
    argv = list(args.training_script_args)
    if argv[:1] == ["--"]:  # kept or dropped by argparse depending on the Python version;
        argv = argv[1:]     # open_clip_sigrel.cli.train.main drops it itself
    return args, argv


# srun options the recipes use, with whether they take a value. srun stops at its first non-option.
SRUN_OPTIONS = {"--cpu_bind": True, "--cpu-bind": True, "--accel-bind": True, "--kill-on-bad-exit": True,
                "--label": False, "-l": False, "--unbuffered": False, "-u": False}
PYTHON_FLAGS = {"-u", "-B", "-E", "-I", "-O", "-s", "-S", "-b", "-q"}  # python options without a value


def srun_training_argv(script: str, cmd: list[str]) -> tuple[list[str], list[str]]:
    """(srun's options, the module's argv) of ``srun [OPTIONS] python [FLAGS] -m MODULE ARGS``."""
    assert cmd[0] == "srun", cmd
    i, srun_opts = 1, []
    while cmd[i].startswith("-"):
        name, eq, _ = cmd[i].partition("=")
        assert name in SRUN_OPTIONS, f"{script}: srun option {cmd[i]!r} unknown to this test: add it to SRUN_OPTIONS"
        takes_value = SRUN_OPTIONS[name]
        assert not (eq and not takes_value), f"{script}: srun {name} takes no value: {cmd[i]!r}"
        width = 2 if takes_value and not eq else 1
        srun_opts += cmd[i:i + width]
        i += width
    assert Path(cmd[i]).name in ("python", "python3"), f"{script}: srun should launch python, got {cmd[i]!r}"
    i += 1
    while cmd[i] != "-m":
        assert cmd[i] in PYTHON_FLAGS, f"{script}: python option {cmd[i]!r} before -m unknown to this test"
        i += 1
    assert cmd[i + 1] == TRAIN_MODULE, cmd[i + 1]
    return srun_opts, cmd[i + 2:]  # python hands everything after `-m MODULE` to the module


@pytest.mark.parametrize("env_name", LAUNCH_ENVS)
@pytest.mark.parametrize("script,loss", CASES)
def test_launcher_line_reaches_the_plugin_parser(script, loss, env_name):
    env = LAUNCH_ENVS[env_name]
    cmd = launcher_line(script, loss, **env)
    if RECIPE[script][1] == "torchrun":
        targs, argv = torchrun_training_argv(script, cmd)
        assert targs.standalone and targs.nproc_per_node == env.get("NPROC_PER_NODE", "8")
        # torchrun kept none of the training flags for itself (the default --logs-specs / --log-dir).
        assert targs.logs_specs is None and targs.log_dir is None
    else:
        srun_opts, argv = srun_training_argv(script, cmd)
        assert srun_opts == ["--cpu_bind=v", "--accel-bind=gn"]
    assert argv == recipe_args(script, loss, **env), "the launcher must hand the module exactly the recipe's ARGS"
    args = _parse(script, argv)
    assert args.logs == env.get("LOGS", "./logs")
    assert args.siglip == (loss == "siglip")
    if env:  # the overrides went through bash, the launcher and both parsers
        assert (args.name, args.batch_size, args.epochs) == ("my-run", 64, 3)
        assert args.imagenet_val == "/mnt/imagenet/val" and args.zeroshot_frequency == 2


@pytest.mark.parametrize("script,loss", TORCHRUN_CASES)
def test_torchrun_check_catches_a_missing_double_dash(script, loss, capsys):
    """Negative control: the launcher line without `--` is what the recipes once shipped, and it fails."""
    cmd = launcher_line(script, loss)
    sep = cmd.index(TRAIN_MODULE) + 1
    assert cmd[sep] == "--"
    broken = cmd[:sep] + cmd[sep + 1:]
    from torch.distributed.run import get_args_parser

    with pytest.raises(SystemExit) as exc:
        get_args_parser().parse_args(broken[1:])
    assert exc.value.code == 2
    assert "ambiguous option: --logs could match --logs-specs" in capsys.readouterr().err
    with pytest.raises(pytest.fail.Exception, match="ambiguous option: --logs"):
        torchrun_training_argv(script, broken)
    torchrun_training_argv(script, cmd)  # while the real line passes the same check


@pytest.mark.parametrize("loss", LOSSES)
def test_srun_check_catches_a_bad_command(loss):
    """Negative control for the srun parse: a foreign option or a wrong program does not slip through."""
    good = launcher_line("laion_slurm.sh", loss)
    _, argv = srun_training_argv("x", good)
    assert argv == recipe_args("laion_slurm.sh", loss)
    with pytest.raises(AssertionError, match="unknown to this test"):
        srun_training_argv("x", good[:1] + ["--mystery"] + good[1:])
    with pytest.raises(AssertionError, match="should launch python"):
        srun_training_argv("x", [a if a != "python" else "torchrun" for a in good])
    with pytest.raises(SystemExit):  # a broken training flag after `-m` reaches the plugin's parser
        parse_args(srun_training_argv("x", good + ["--no-such-flag"])[1])


# ---------------------------------------------------------------- one recipe really runs (2 CPU processes)


def rewrite_args(argv: list[str], replace: dict[str, str], drop: dict[str, int] = (), add: list[str] = ()):
    """The recipe's own argument list with the values of ``replace``'s flags swapped (each must be there),
    ``drop``'s flags (with their number of values) removed, and ``add`` appended."""
    out, i, seen = [], 0, set()
    drop = dict(drop)
    while i < len(argv):
        flag = argv[i]
        if flag in replace:
            out += [flag, replace[flag]]
            seen.add(flag)
            i += 2
        elif flag in drop:
            i += 1 + drop[flag]
        else:
            out.append(flag)
            i += 1
    missing = set(replace) - seen
    assert not missing, f"the recipe no longer passes {sorted(missing)}"
    return out + list(add)


def test_rewrite_args_keeps_everything_else():
    argv = ["--a", "1", "--flag", "--b", "2", "--c", "3", "x"]
    assert rewrite_args(argv, {"--b": "20"}, {"--c": 2}, ["--d", "4"]) == ["--a", "1", "--flag", "--b", "20", "--d", "4"]
    with pytest.raises(AssertionError, match="--zzz"):
        rewrite_args(argv, {"--zzz": "0"})


# (recipe, loss) runs, with the recipe's own values that must reach the run: beta2, lr, resampled, checkpointing
TRAIN_RUNS = [(s, loss) for s in ("cc3m_8gpu.sh", "laion_slurm.sh") for loss in LOSSES]
RUN_VALUES = {"cc3m_8gpu.sh": ("0.98", "0.0005", "False", "False"), "laion_slurm.sh": ("0.95", "0.001", "True", "True")}


def _flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def test_the_training_runs_cover_every_recipe():
    """cc12m's argument set has cc3m's flags (only values differ, and the CPU run replaces them), so the
    cc3m runs below stand for it; laion's has flags of its own (resampling, gradient checkpointing)."""
    for loss in LOSSES:
        assert _flags(recipe_args("cc12m_8gpu.sh", loss)) == _flags(recipe_args("cc3m_8gpu.sh", loss))
        assert {"--dataset-resampled", "--grad-checkpointing"} <= set(_flags(recipe_args("laion_slurm.sh", loss)))
    assert {s for s, _ in TRAIN_RUNS} | {"cc12m_8gpu.sh"} == set(SCRIPTS)


@pytest.mark.parametrize("script,loss", TRAIN_RUNS)
def test_recipe_argument_set_trains_under_torchrun_on_two_cpu_processes(digits_data, tmp_path, script, loss):
    cmd, argv = launcher_line(script, loss), recipe_args(script, loss)
    if RECIPE[script][1] == "torchrun":
        sep = cmd.index(TRAIN_MODULE) + 1
        assert cmd[sep] == "--" and cmd[sep + 1:] == argv
        # The recipe's own launcher line (--standalone ... -m MODULE --), with 2 processes instead of 8.
        launcher = rewrite_args(cmd[1:sep + 1], {"--nproc_per_node": "2"})
    else:  # srun is not here: the same training arguments under torchrun (they do not depend on the launcher)
        assert srun_training_argv(script, cmd)[1] == argv
        launcher = ["--standalone", "--nproc_per_node", "2", "-m", TRAIN_MODULE, "--"]
    logs, name = tmp_path / "logs", f"recipe-cpu-{loss}"
    train = rewrite_args(argv, {
        "--model": "sigrel-tiny", "--train-data": digits_data["train_data"],
        "--train-num-samples": str(digits_data["train_num_samples"]), "--val-data": digits_data["val_data"],
        "--val-num-samples": str(digits_data["val_num_samples"]), "--batch-size": "32", "--epochs": "1",
        "--workers": "0", "--precision": "fp32", "--warmup": "2", "--logs": str(logs), "--name": name,
    }, drop={"--imagenet-val": 1, "--zeroshot-frequency": 1}, add=["--device", "cpu"])
    full = [sys.executable, "-m", "torch.distributed.run", *launcher, *train]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: a hang kills the workers too
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the 2-process run hung (300 s):\n{shlex.join(full)}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{shlex.join(full)}\n{err[-6000:]}\n{out[-1000:]}"
    run = logs / name
    assert (run / "checkpoints" / "epoch_1.pt").is_file()
    params = dict(line.split(": ", 1) for line in (run / "params.txt").read_text().splitlines())
    # The recipe's own choices reached the run (sizes aside) and both processes took part.
    assert params["loss_dist_impl"] == "bidir" and params["world_size"] == "2"
    if loss == "sigrel":
        assert params["loss"] == "sigrel" and params["siglip"] == "False"
    else:
        assert params["siglip"] == "True" and params["loss"] in ("None", "siglip")
    assert params["sigrel_max_logit_scale"] == "1000.0" and params["precision"] == "fp32"
    assert params["model"] == "sigrel-tiny"
    assert (params["beta2"], params["lr"], params["dataset_resampled"], params["grad_checkpointing"]) == RUN_VALUES[script]
    log = (run / "out.log").read_text()
    # --resume latest kept (open_clip then sets args.resume to what it found): nothing yet, a fresh start.
    assert "No latest resume checkpoint found" in log and params["resume"] == "None"
    rows = (run / "checkpoints" / "results.jsonl").read_text().splitlines()
    assert rows and "margin_mean" in rows[-1]  # --val-frequency 1: evaluated, geometry metrics logged

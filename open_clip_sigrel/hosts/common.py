"""What both host adapters share: the run's state, the model extension at creation, the loss
monitor (step clock, non-finite guard, training telemetry) and the geometry hook on evaluation.

Nothing here names an open_clip_train internal; the adapters (open_clip3 / open_clip4) decide
where these pieces are plugged in.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from collections.abc import Iterator

import torch
import torch.nn as nn

from open_clip_sigrel.bias import logit_bias_from_rel_bias, rel_bias_from_logit_bias
from open_clip_sigrel.hosts.options import check_t_in_clamp, t_clamp
from open_clip_sigrel.hosts.telemetry import Telemetry, batch_constellation
from open_clip_sigrel.loss import SigRelLoss
from open_clip_sigrel.model import enable_rel_bias, has_rel_bias, sigrel_values

_logger = logging.getLogger("open_clip_sigrel")

# The non-finite guard reads its device-side flag every CHECK_EVERY optimizer steps (and on every
# log step): one tiny collective and one device-to-host read there, none on the other steps.
CHECK_EVERY = 10


class SigrelRun:
    """What the plugged-in functions share during one open_clip training run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model: nn.Module | None = None
        self.epoch = 0
        self.steps_per_epoch = 0
        self.loss_calls = 0
        self.tb_writer = None
        self.optimizer = None
        self._scalars = None
        self.telemetry = Telemetry(args)

    # -- the host's epoch loop
    def start_epoch(self, epoch: int, num_batches: int, tb_writer=None, optimizer=None) -> None:
        self.epoch, self.tb_writer, self.optimizer, self.loss_calls = epoch, tb_writer, optimizer, 0
        self.steps_per_epoch = num_batches // self.args.accum_freq
        self._scalar_params()  # found before the first forward (FSDP2 has re-created them by now)

    @property
    def step_in_epoch(self) -> int:
        """Index of the optimizer step in progress (the host calls the loss accum_freq times a step)."""
        return max(self.loss_calls - 1, 0) // self.args.accum_freq

    @property
    def step(self) -> int:
        """The host's global step, as it logs it: steps_per_epoch * epoch + step in epoch."""
        return self.steps_per_epoch * self.epoch + self.step_in_epoch

    # -- model
    def create_model_and_transforms(self, original, model_name, pretrained=None, **kwargs):
        args = self.args
        if self.model is not None or args.loss != "sigrel":  # distillation teacher, or not sigrel
            out = original(model_name, pretrained, **kwargs)
            self.model = self.model or out[0]
            return out
        t0, b0 = args.sigrel_init_logit_scale, args.sigrel_init_rel_bias
        kwargs.update(init_logit_scale=math.log(t0), init_logit_bias=logit_bias_from_rel_bias(b0, t0))
        with _record_checkpoint_keys() as seen:
            model, *transforms = original(model_name, pretrained, **kwargs)
        loaded = bool(seen)
        had_bias = any("logit_bias" in keys for keys in seen)
        explicit = args.sigrel_explicit_init
        enable_rel_bias(
            model,
            rel_bias=b0 if (not loaded or explicit["rel_bias"] or not had_bias) else None,
            logit_scale=t0 if (not loaded or explicit["logit_scale"]) else None,
            fixed_rel_bias=args.sigrel_fixed_rel_bias,
            fixed_logit_scale=args.sigrel_fixed_logit_scale,
        )
        from_checkpoint = loaded and not explicit["logit_scale"]
        t, t_max = sigrel_values(model)["logit_scale"], t_clamp(args)
        if from_checkpoint and not args.sigrel_fixed_logit_scale and t > t_max * (1 + 1e-6):
            # a trainable t above the clamp (a SigLIP checkpoint's t ~ 117): clamped now, said so, rather
            # than by the loop after the first step; b_rel (the parameter) is kept
            with torch.no_grad():
                model.logit_scale.fill_(math.log(t_max))
            _logger.warning(f"sigrel: t = {t:.4f} from the pretrained checkpoint is above the clamp {t_max:g} applied "
                            f"after every step: clamped to {t_max:g} before the first step (pass "
                            f"--sigrel-max-logit-scale {t:.4g} or inf to keep it)")
        else:
            check_t_in_clamp(t, args, "from the pretrained checkpoint" if from_checkpoint else "--sigrel-init-logit-scale")
        _warn_if_stock_cannot_load(model_name)
        v = sigrel_values(model)
        _logger.info(
            f"sigrel: t = {v['logit_scale']:.4f}, b_rel = {v['rel_bias']:.4f} (logit_bias = {v['logit_bias']:.4f})"
            + (" from the pretrained checkpoint" if loaded and had_bias else "")
            + (", b_rel fixed" if args.sigrel_fixed_rel_bias else "")
            + (", t fixed" if args.sigrel_fixed_logit_scale else "")
        )
        self.model = model
        return (model, *transforms)

    # -- loss
    def sigrel_loss(self) -> SigRelLoss:
        args = self.args
        # auto: the ring's upstream-gradient check is deferred on accelerators; LossMonitor calls
        # check_upstream_gradients() on its check steps
        return SigRelLoss(rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl,
                          normalize=args.sigrel_normalize, chunk_size=args.sigrel_chunk_size, upstream_check="auto")

    def exact_bias(self, t: torch.Tensor, bias, b_rel: torch.Tensor):
        """(t, logit_bias, b_rel) of the step from the parameters themselves, in their own precision.

        Under FSDP2 mixed precision the forward sees t and b_rel rounded to bf16/fp16; the logs show the
        trained (sharded, fp32) values. Every rank calls this at the same steps (a DTensor gathers
        collectively). With CPU offload the shards live off the loss's device: the forward's values.
        """
        params = self._scalar_params()
        if params is None:
            return t, bias, b_rel
        scale, rel = params
        if any(p.device != t.device for p in (scale, rel)):
            return t, bias, b_rel
        with torch.no_grad():
            t = _full(scale).float().exp().reshape(())
            b_rel = _full(rel).float().reshape(()).clone()  # the host reads it after the step
        return t, logit_bias_from_rel_bias(b_rel, t), b_rel

    def _scalar_params(self):
        """(logit_scale, rel_bias) as the optimizer holds them (FSDP2's sharded DTensors), found by name
        when the first epoch starts: after a forward without resharding, FSDP2 leaves unsharded
        low-precision copies registered in their place."""
        if self._scalars is None and self.model is not None and has_rel_bias(self.model):
            named = dict(self.model.named_parameters())
            self._scalars = (named["logit_scale"], named["rel_bias"])
        return self._scalars

    # -- evaluation
    def bias_values(self) -> dict[str, float]:
        """t, b_rel and logit_bias of the model being trained (b_rel = -logit_bias / t for any bias).

        Called on rank 0 alone (open_clip evaluates there), so parameters are read from the local
        shard under FSDP2 (a [1] parameter lives whole on rank 0): no collective.
        """
        model = self.model
        if model is None or not hasattr(model, "logit_scale"):
            return {}
        with torch.no_grad():
            t = math.exp(_local_scalar(model.logit_scale))
            if has_rel_bias(model):
                b = _local_scalar(model.rel_bias)
                return {"logit_scale": t, "rel_bias": b, "logit_bias": logit_bias_from_rel_bias(b, t)}
            bias = getattr(model, "logit_bias", None)
            if bias is None:
                return {"logit_scale": t}
            lb = _local_scalar(bias)
        return {"logit_scale": t, "rel_bias": rel_bias_from_logit_bias(lb, t), "logit_bias": lb}

    def get_clip_metrics(self, original, image_features, text_features, logit_scale, **kwargs):
        metrics = original(image_features=image_features, text_features=text_features, logit_scale=logit_scale,
                           **kwargs)
        from open_clip_sigrel.metrics.geometry import PRESETS, geometry_metrics

        preset = self.args.sigrel_geometry  # --sigrel-geometry
        if not PRESETS[preset]:
            return metrics

        if isinstance(image_features, (list, tuple)):  # open_clip 4.x hands over the per-batch chunks
            image_features, text_features = torch.cat(list(image_features)), torch.cat(list(text_features))
        values = self.bias_values()
        geometry = geometry_metrics(
            image_features, text_features, logit_scale=float(logit_scale), logit_bias=values.get("logit_bias"),
            metrics=PRESETS[preset],
        )
        for key, value in geometry.items():
            metrics.setdefault(key, value)
        return metrics


def _warn_if_stock_cannot_load(model_name: str) -> None:
    """Stock open_clip builds a model whose config has no ``init_logit_bias`` without a bias, and then
    cannot load a sigrel checkpoint's logit_bias; one keyword makes it."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is not None and cfg.get("init_logit_bias") is None:
        _logger.warning(
            f"sigrel: the config of {model_name} has no init_logit_bias, so stock open_clip builds it without a "
            f"bias; load this run's checkpoints with open_clip.create_model_and_transforms({model_name!r}, "
            "pretrained=PATH, init_logit_bias=0.0) (the checkpoint's value replaces the 0.0)")


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor under FSDP2: a collective


def _local_scalar(p: torch.Tensor) -> float:
    local = p.to_local() if hasattr(p, "to_local") else p  # DTensor under FSDP2
    return float(local.detach().float().reshape(-1)[0])


class NonFiniteGuard:
    """Stops every rank on a non-finite loss without a host synchronisation per micro-step.

    ``observe`` keeps, on the device, the first step whose loss was not finite and t, b_rel there;
    ``check`` (every rank, at the same steps) takes the minimum over ranks in one all_reduce and
    raises on every rank at once, so none is left waiting in a collective.
    """

    def __init__(self):
        self._state: torch.Tensor | None = None  # [first bad step (inf if none), t, b_rel]

    def observe(self, total: torch.Tensor, step: int, t: torch.Tensor, b_rel: torch.Tensor) -> None:
        total = total.detach()
        if self._state is None:
            self._state = torch.tensor([math.inf, math.nan, math.nan], device=total.device, dtype=torch.float64)
        step_t = torch.full((), float(step), dtype=torch.float64, device=total.device)  # a fill, not a copy
        row = torch.stack([step_t, t.detach().reshape(-1)[0].double(), b_rel.detach().reshape(-1)[0].double()])
        first = ~torch.isfinite(total).all() & torch.isinf(self._state[0])
        self._state = torch.where(first, row, self._state)

    def check(self, steps_per_epoch: int) -> None:
        if self._state is None:
            return
        state = self._state.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Min over ranks of the first bad step; the values travel with the rank that saw it first.
            step = state[:1].clone()
            torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MIN)
            mine = state[0] == step[0]
            values = torch.where(mine, state[1:], torch.zeros_like(state[1:]))
            count = mine.double().reshape(1)
            torch.distributed.all_reduce(values)
            torch.distributed.all_reduce(count)
            state = torch.cat([step, values / count.clamp_min(1)])
        step, t, b = state.tolist()
        if math.isinf(step):
            return
        step = int(step)
        where = (f" (epoch {step // steps_per_epoch}, batch {step % steps_per_epoch} of the epoch)"
                 if steps_per_epoch else "")  # a patched stock loop tells no epoch
        raise FloatingPointError(
            f"non-finite loss at step {step}{where}: "
            f"t = {t:.6g}, b_rel = {b:.6g}, logit_bias = {logit_bias_from_rel_bias(b, t):.6g}. Lower the learning rate, use "
            "--precision amp_bf16 or fp32, or clip gradients (--grad-clip-norm)."
        )


class LossMonitor(nn.Module):
    """Wraps the run's loss: counts calls (the step clock), guards against a non-finite loss and
    records the training telemetry on the host's log steps.

    ``report`` decides where the telemetry goes: "losses" (open_clip 4.x logs every non-``*_loss``
    key of the loss dict as a train/ scalar) or "writer" (open_clip 3.x sums every key, so the
    scalars go to its TensorBoard writer / W&B at its step instead).
    """

    def __init__(self, loss: nn.Module, run: SigrelRun, is_log_step, report: str):
        super().__init__()
        self.loss = loss
        self._run = [run]  # a list keeps the run out of the module tree
        self._is_log_step = is_log_step
        self._report = report
        self.guard = NonFiniteGuard()
        if getattr(run.args, "torchcompile", False):
            # When open_clip 4.x compiles the forward that calls the loss (strategies task / step), the
            # step clock, host reads and SigRelLoss's ring collectives stay eager (as open_clip keeps its
            # own fused loss); a stock loss stays inside the compiled graph.
            self._after_loss = torch.compiler.disable(self._after_loss)
            if isinstance(loss, SigRelLoss):
                loss.forward = torch.compiler.disable(loss.forward)

    def forward(self, **kwargs):
        return self._after_loss(self.loss(**kwargs), kwargs)

    def _after_loss(self, out, kwargs: dict):
        run = self._run[0]
        run.loss_calls += 1
        total = sum(out.values()) if isinstance(out, dict) else out
        t, bias = kwargs["logit_scale"], kwargs.get("logit_bias")
        b_rel = rel_bias_from_logit_bias(bias, t) if bias is not None else torch.full_like(t, math.nan)
        step, i = run.step, run.step_in_epoch
        self.guard.observe(total, step, t, b_rel)
        if run.loss_calls % run.args.accum_freq:  # not the step's last micro-batch
            return out
        log_step = self._is_log_step(i, run.steps_per_epoch, run.args)
        if log_step or i % CHECK_EVERY == 0:
            self.guard.check(run.steps_per_epoch)
            check_upstream = getattr(self.loss, "check_upstream_gradients", None)
            if check_upstream is not None:  # SigRelLoss's deferred ring check (accelerators)
                check_upstream()
        if not log_step:
            if not run.steps_per_epoch and bias is not None and self._report == "losses":
                # No epoch clock (a patched stock loop): the host's metric steps are unknown, so the
                # cheap b_rel rides along every step rather than going stale between steps.
                out = {**out, "rel_bias": run.exact_bias(t, bias, b_rel)[2].detach()}
            return out
        t, bias, b_rel = run.exact_bias(t, bias, b_rel)
        scalars = {"rel_bias": b_rel.detach().reshape(-1)[0]} if bias is not None else {}
        if run.steps_per_epoch:  # with an epoch clock: the host logs them at exactly these steps
            batch = batch_constellation(kwargs["image_features"].detach(), kwargs["text_features"].detach())
            scalars.update({f"batch_{k}": v for k, v in batch.items()})
        if self._report == "losses" and isinstance(out, dict):
            out = {**out, **scalars}
        if getattr(run.args, "rank", 0) == 0:
            if not run.steps_per_epoch and "batch_margin_worst" not in scalars:
                batch = batch_constellation(kwargs["image_features"].detach(), kwargs["text_features"].detach())
                scalars = {**scalars, **{f"batch_{k}": v for k, v in batch.items()}}
            self._record(run, step, total, t, bias, scalars)
        return out

    def _record(self, run: SigrelRun, step: int, total, t, bias, scalars: dict) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        t = float(t.detach().reshape(-1)[0])
        record = {"step": step, "epoch": run.epoch, "time": time.time(), "loss": float(total.detach()),
                  "logit_scale": t}
        if bias is not None:
            record["logit_bias"] = float(bias.detach().reshape(-1)[0])
        if run.optimizer is not None:
            record["lr"] = float(run.optimizer.param_groups[0]["lr"])  # a tensor under --torchcompile-strategy step
        record.update(values)
        run.telemetry.write(record)
        if self._report == "writer":  # 3.x: its console line and writers know nothing of b_rel
            _logger.info(f"sigrel step {step}: t {t:.4f}"
                         + (f" b_rel {values['rel_bias']:.4f} logit_bias {record['logit_bias']:.4f}"
                            if "logit_bias" in record else "")
                         + "".join(f" {k} {v:.4f}" for k, v in values.items() if k.startswith("batch_")))
            named = {f"train/{k}": v for k, v in values.items()}
            if "logit_bias" in record:
                named["train/logit_bias"] = record["logit_bias"]
            if run.tb_writer is not None:
                for name, value in named.items():
                    run.tb_writer.add_scalar(name, value, step)
            if getattr(run.args, "wandb", False):
                import wandb

                wandb.log(named, step=step)


@contextlib.contextmanager
def _record_checkpoint_keys() -> Iterator[list]:
    """Records the keys of every state dict open_clip's factory loads (did the weights have a bias?)."""
    import open_clip.factory as factory

    seen: list = []
    original = factory.load_state_dict

    def load_state_dict(*a, **kw):
        sd = original(*a, **kw)
        seen.append(set(sd))
        return sd

    factory.load_state_dict = load_state_dict
    try:
        yield seen
    finally:
        factory.load_state_dict = original


class CpuSafeDDP(torch.nn.parallel.DistributedDataParallel):
    """open_clip passes device_ids=[cpu device], which DDP rejects; CPU modules take none."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


@contextlib.contextmanager
def swapped(obj, name: str, value) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def run_open_clip_main(argv: list[str], parse, run_hooks, plain_swaps=(), check_args=None) -> int:
    """open_clip_train.main.main(argv) with names swapped for one run (and restored after).

    Both adapters swap ``parse_args`` (``parse(argv, stock_parse_args)`` -> args, then ``check_args`` and
    the checks of the data and the checkpoints), ``create_model_and_transforms``, ``train.get_clip_metrics``,
    torch's DDP (no ``device_ids`` on CPU), main's ``torch`` (atomic ``torch.save``), its
    ``get_latest_checkpoint`` (complete checkpoints only) and the data's error handlers (``data_guard``).
    ``run_hooks``: (module, name, fn) with ``fn(run, original, *args, **kwargs)``; ``plain_swaps``:
    (module, name, value).
    """
    import open_clip_train.main as oc_main
    import open_clip_train.train as oc_train

    from open_clip_sigrel.hosts import checkpoint, data_guard

    holder: dict = {}
    stock_parse_args = oc_main.parse_args

    def parse_args(a):
        args = parse(a, stock_parse_args)
        if check_args is not None:
            check_args(args)
        data_guard.check_shards(args)
        checkpoint.check_resume(args)
        holder["run"] = SigrelRun(args)
        for module, name, value in [(oc_main, "torch", checkpoint.torch_with_atomic_save(args)),
                                    *data_guard.swaps(args)]:
            holder["stack"].enter_context(swapped(module, name, value))
        return args

    def hook(fn, original):
        return lambda *a, **kw: fn(holder["run"], original, *a, **kw)

    def latest_checkpoint(run, original, path, remote):
        found = checkpoint.latest_complete_checkpoint(original, path, remote)
        if found is not None:
            checkpoint.check_resume_setup(found, run.args)
        return found

    run_hooks = [(oc_main, "create_model_and_transforms", SigrelRun.create_model_and_transforms),
                 (oc_main, "get_latest_checkpoint", latest_checkpoint),
                 (oc_train, "get_clip_metrics", SigrelRun.get_clip_metrics), *run_hooks]
    plain_swaps = [(oc_main, "parse_args", parse_args),
                   (torch.nn.parallel, "DistributedDataParallel", CpuSafeDDP), *plain_swaps]
    with contextlib.ExitStack() as stack:
        holder["stack"] = stack
        for module, name, fn in run_hooks:
            stack.enter_context(swapped(module, name, hook(fn, getattr(module, name))))
        for module, name, value in plain_swaps:
            stack.enter_context(swapped(module, name, value))
        status = oc_main.main(argv)
    return int(status or 0)

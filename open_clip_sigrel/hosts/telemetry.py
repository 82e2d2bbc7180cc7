"""Training telemetry as data: the scalars of each host log step in ``<logs>/<name>/sigrel_train.jsonl``,
the batch geometry they carry, and the reader the demo, the benchmarks and users share."""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from open_clip_sigrel.io import read_jsonl
from open_clip_sigrel.metrics.functional import margin_and_rel_bias

TELEMETRY_FILE = "sigrel_train.jsonl"


@torch.no_grad()
def batch_constellation(image_features: torch.Tensor, text_features: torch.Tensor, chunk_size: int = 1024
                        ) -> dict[str, torch.Tensor]:
    """Worst-case and mean halved margin / relative bias of one local batch (the paper's m*, b*_rel).

    Returned as float32 0-d tensors on the features' device (no host synchronisation); sums and the
    margin formula (``metrics.functional.margin_and_rel_bias``) in float64; row blocks keep memory at
    chunk_size x B. The full metric set is open_clip_sigrel.metrics.geometry's.
    """
    x = torch.nn.functional.normalize(image_features.float(), dim=-1)
    y = torch.nn.functional.normalize(text_features.float(), dim=-1)
    n = x.shape[0]
    if n < 2:  # no negatives: the same keys (every rank reports the same set), undefined values
        nan = x.new_full((), math.nan)
        return {"margin_worst": nan, "rel_bias_worst": nan, "margin_mean": nan, "rel_bias_mean": nan}
    f64 = torch.float64
    pos = (x * y).sum(-1, dtype=f64)
    neg_max = x.new_full((), -math.inf)
    neg_sum = x.new_zeros((), dtype=f64)
    for lo in range(0, n, chunk_size):
        s = x[lo:lo + chunk_size] @ y.T
        rows = torch.arange(s.shape[0], device=s.device)
        diag = s[rows, rows + lo].clone()
        neg_sum += s.sum(dtype=f64) - diag.sum(dtype=f64)
        s[rows, rows + lo] = -math.inf
        neg_max = torch.maximum(neg_max, s.max())
    m_worst, b_worst = margin_and_rel_bias(pos.min(), neg_max.to(f64))
    m_mean, b_mean = margin_and_rel_bias(pos.mean(), neg_sum / (n * (n - 1)))
    return {"margin_worst": m_worst.float(), "rel_bias_worst": b_worst.float(),
            "margin_mean": m_mean.float(), "rel_bias_mean": b_mean.float()}


class Telemetry:
    """Training scalars as data: one JSON object per host log step in ``<logs>/<name>/sigrel_train.jsonl``.

    Schema (one line each): step (the host's global step, as in TensorBoard), epoch, time (unix s),
    lr, loss (this rank's total loss of the step), logit_scale (t), rel_bias (b_rel = -logit_bias / t),
    logit_bias, and batch_margin_worst / batch_rel_bias_worst / batch_margin_mean /
    batch_rel_bias_mean of rank 0's local batch. All values are those of the step's forward pass
    (before its optimizer update), like open_clip's own logit_scale. Rank 0 writes; appended on
    --resume.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @property
    def path(self) -> str | None:
        logs, name = getattr(self.args, "logs", None), getattr(self.args, "name", None)
        if not logs or str(logs).lower() == "none" or not name:
            return None
        return os.path.join(logs, name, TELEMETRY_FILE)

    def write(self, record: dict) -> None:
        path = self.path
        if path is None or getattr(self.args, "rank", 0) != 0:
            return
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_telemetry(path: str | os.PathLike, *, strict: bool = True) -> list[dict]:
    """The records of a run's sigrel_train.jsonl (a file, or the run folder that holds it); strict=False
    skips a last line cut short (a run still writing)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TELEMETRY_FILE)
    return read_jsonl(path, strict=strict)

import os
import sys
from pathlib import Path

import pytest

# Tests run on CPU with few threads; keep torch from oversubscribing the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# gloo's default interface may not route to this host; loopback serves single-host tests.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
REPO = Path(__file__).resolve().parents[1]
# The folder a test lives in is its kind (markers registered in pyproject.toml): select with -m, e.g.
# `pytest -m unit` (seconds), `pytest -m "not research"`. test_cuda.py is marked cuda as well.
KINDS = ("unit", "distributed", "integration", "research")


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = Path(item.fspath).resolve().relative_to(REPO / "tests").parts[0]
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(KINDS)}}}/, not in tests/{kind}")
        item.add_marker(kind)
        if Path(item.fspath).name == "test_cuda.py":
            item.add_marker("cuda")


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """A small copy of the shipped real-image dataset (digit mosaics), made once per session."""
    from open_clip_sigrel.tools.data import make_digits_dataset

    return make_digits_dataset(tmp_path_factory.mktemp("digits") / "data", n_train=512, n_val=128, shard_size=128)


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


STOCK_LOAD = """
import json, os, sys, tempfile, torch, open_clip
# What a user without the plugin does: register model_cfg of the hub-format config, then load.
cfg, ckpt = sys.argv[1:]
d = tempfile.mkdtemp(); p = os.path.join(d, "sigrel-tiny.json")
json.dump(json.load(open(cfg))["model_cfg"], open(p, "w")); open_clip.add_model_config(p)
model, _, _ = open_clip.create_model_and_transforms("sigrel-tiny", pretrained=ckpt)
torch.manual_seed(0)
img, txt = torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16))
with torch.no_grad():
    logits, _ = model.get_logits(img, txt)
    s = model.encode_image(img, normalize=True) @ model.encode_text(txt, normalize=True).T
assert not any(m.startswith("open_clip_sigrel") for m in sys.modules), "plugin was imported"
print(json.dumps({"logits": logits.tolist(), "s": s.tolist()}))
"""


@pytest.fixture(scope="session")
def stock_logits(python):
    """(logits, similarities) of a checkpoint loaded by stock open_clip in a process without the plugin,
    on fixed inputs (seed 0: 4 random 32 x 32 images, 4 random token rows)."""
    import json
    import subprocess

    import torch

    cfg = REPO / "open_clip_sigrel" / "configs" / "sigrel-tiny.json"

    def load(ckpt):
        out = subprocess.run([python, "-c", STOCK_LOAD, str(cfg), str(ckpt)], capture_output=True, text=True,
                             check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        return torch.tensor(got["logits"], dtype=torch.float64), torch.tensor(got["s"], dtype=torch.float64)

    return load

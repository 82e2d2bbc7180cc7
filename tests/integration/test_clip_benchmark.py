"""clip_benchmark interop with clip_benchmark really installed and run (issue 11 points 1-3): it evaluates
make-data's folder and a multi-caption folder with a sigrel-config checkpoint (its open_clip model type),
our eval reads the same folders, the numbers under clip_benchmark's names agree, and `clip_benchmark build`
tabulates both results in one table."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from open_clip_sigrel.cli import main

pytest.importorskip("clip_benchmark", reason="clip-benchmark (the 'benchmark' extra)")
pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "open_clip_sigrel" / "configs"
CB_KEYS = [f"{w}_retrieval_recall@{k}" for k in (1, 5, 10) for w in ("image", "text")]


def _clip_benchmark(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", "import sys; from clip_benchmark.cli import main; sys.exit(main())",
                           *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _png(i: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(i).integers(0, 255, size=(32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import open_clip

    from open_clip_sigrel.tools.data import make_digits_dataset

    root = tmp_path_factory.mktemp("cb")
    # a checkpoint of the shipped sigrel-tiny config as a local-dir model: stock open_clip (and so
    # clip_benchmark's open_clip model type) loads it without this package
    model_cfg = json.loads((CONFIGS / "sigrel-tiny.json").read_text())["model_cfg"]
    local = root / "sigrel-tiny-ckpt"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    cfg_path = root / "cbtest-sigrel-tiny.json"
    cfg_path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(cfg_path)
    net = open_clip.create_model("cbtest-sigrel-tiny")
    torch.save(net.state_dict(), local / "open_clip_pytorch_model.bin")

    make_digits_dataset(root / "digits", n_train=8, n_val=30, shard_size=12, csv=False)
    multi = root / "multicap"  # clip_benchmark's local webdataset layout, several captions per image
    (multi / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(2):
        with tarfile.open(multi / "test" / f"{s}.tar", "w") as tf:
            for i in range(10 * s, 10 * s + 10):
                caps = "\n".join(f"digits {i % 7} {j}" for j in range(int(rng.integers(1, 4))))
                for ext, data in (("png", _png(i)), ("txt", caps.encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (multi / "test" / "nshards.txt").write_text("2\n")
    (multi / "dataset_type.txt").write_text("retrieval\n")
    return {"root": root, "model": f"local-dir:{local}", "digits": root / "digits", "multi": multi}


@pytest.mark.parametrize("name, split", [("digits", "val"), ("multi", "test")])
def test_clip_benchmark_and_our_eval_agree_and_build_one_table(env, tmp_path, capsys, name, split):
    folder = env[name]
    dataset = f"wds/{folder.name}"
    cb_out = tmp_path / "cb.json"
    _clip_benchmark("eval", "--dataset", dataset, "--dataset_root", str(folder), "--split", split,
                    "--task", "zeroshot_retrieval", "--model_type", "open_clip", "--model", env["model"],
                    "--pretrained", "sigrel", "--no_amp", "--recall_k", "1", "5", "10", "--batch_size", "64",
                    "--num_workers", "0", "--output", str(cb_out), cwd=tmp_path)
    cb = json.loads(cb_out.read_text())

    ours_out = tmp_path / "ours.json"
    rc = main(["eval", "--model", env["model"], "--pretrained", "sigrel", "--data", str(folder), "--split", split,
               "--device", "cpu", "--batch-size", "64", "--output", str(ours_out)])
    assert rc == 0, capsys.readouterr().err
    ours = json.loads(ours_out.read_text())
    for key in ("model", "pretrained", "dataset", "language"):
        assert ours[key] == cb[key], key
    for key in CB_KEYS:  # clip_benchmark's numbers, under its names, from our pass
        assert ours["metrics"][key] == pytest.approx(cb["metrics"][key], rel=1e-6), key
    m = ours["metrics"]
    for k in (1, 5, 10):  # no ties in real embeddings: our documented rule gives the same recall
        assert m[f"text_to_image_R@{k}"] == pytest.approx(cb["metrics"][f"image_retrieval_recall@{k}"], rel=1e-6)
        assert m[f"image_to_text_R@{k}"] == pytest.approx(cb["metrics"][f"text_retrieval_recall@{k}"], rel=1e-6)
    if name == "multi":
        assert m["n_images"] == 20 and m["n_pairs"] > 20

    table = tmp_path / "table.csv"
    _clip_benchmark("build", str(cb_out), str(ours_out), "--output", str(table), cwd=tmp_path)
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 2 and {r["task"] for r in rows} == {"zeroshot_retrieval", "geometry"}
    assert len({(r["model_fullname"], r["dataset"], r["language"]) for r in rows}) == 1  # one model, one dataset
    for key in CB_KEYS:
        a, b = (float(r[key]) for r in rows)
        assert a == pytest.approx(b, rel=1e-6), key
    geometry = next(r for r in rows if r["task"] == "geometry")
    assert float(geometry["margin_mean"]) == pytest.approx(m["margin_mean"], rel=1e-12)

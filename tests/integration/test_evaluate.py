"""`open-clip-sigrel eval` end to end on a tiny random model and tiny local data (nothing downloaded)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from open_clip_sigrel.cli import main
from open_clip_sigrel.metrics.geometry import geometry_metrics

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
WIDE = {  # same family, other widths: its checkpoint does not fit TINY
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1},
}


def _png(i: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _samples(start: int, n: int):
    return [(f"{i:06d}", {"png": _png(i), "txt": f"a photo of thing {i}\nsecond caption".encode()})
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("eval")
    bare = root / "geomtest-tiny.json"
    bare.write_text(json.dumps(TINY))
    hub = root / "geomtest-wide.json"  # open_clip hub format: registered under the file stem
    hub.write_text(json.dumps({"model_cfg": WIDE, "preprocess_cfg": {}}))
    open_clip.add_model_config(bare)
    torch.manual_seed(0)
    model = open_clip.create_model("geomtest-tiny")
    ckpt = root / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, ckpt)
    from open_clip_sigrel.configs import add_model_config

    add_model_config(hub)
    wide = root / "wide.pt"
    torch.save({"epoch": 1, "state_dict": open_clip.create_model("geomtest-wide").state_dict()}, wide)

    shards = root / "shards"
    shards.mkdir()
    for s in range(3):
        _write_tar(shards / f"{s}.tar", _samples(4 * s, 4))
    bench = root / "bench" / "test"
    bench.mkdir(parents=True)
    for s in range(2):
        _write_tar(bench / f"{s}.tar", _samples(100 + 3 * s, 3))
    (bench / "nshards.txt").write_text("2\n")
    imgs = root / "csvimgs"
    imgs.mkdir()
    rows = ["filepath\ttitle"]
    for i in range(7):
        (imgs / f"{i}.png").write_bytes(_png(200 + i))
        rows.append(f"csvimgs/{i}.png\tcaption number {i}")
    csv = root / "pairs.tsv"
    csv.write_text("\n".join(rows) + "\n")
    return {"root": root, "cfg": bare, "hub": hub, "ckpt": ckpt, "wide": wide, "shards": shards,
            "bench": root / "bench", "csv": csv}


def _model_args(env, *extra):
    return ["eval", "--model", "geomtest-tiny", "--model-config", str(env["cfg"]), "--pretrained",
            str(env["ckpt"]), "--device", "cpu", *extra]


def test_model_on_shards(env, tmp_path, capsys):
    out = tmp_path / "sub" / "out.json"
    plots = tmp_path / "plots"
    rc = main(_model_args(env, "--data", f"{env['shards']}/{{0..2}}.tar", "--batch-size", "5",
                          "--output", str(out), "--plots", str(plots)))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads(out.read_text())
    assert set(res) == {"model", "pretrained", "dataset", "language", "task", "metrics", "dataset_path"}
    assert res["task"] == "geometry" and res["model"] == "geomtest-tiny" and res["pretrained"] == str(env["ckpt"])
    assert res["dataset"] == "wds/shards" and res["dataset_path"] == f"{env['shards']}/{{0..2}}.tar"
    assert res["language"] == "en"
    m = res["metrics"]
    assert m["n_pairs"] == 24 and m["n_images"] == 12  # two captions per image (two .txt lines)
    assert m["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's CLIP init, t = 1/0.07
    assert m["logit_bias"] == 0.0 and "sigmoid_loss" in m
    for k in ("margin_worst", "rel_bias_trimmed", "linear_separability", "rmg", "image_to_text_R@1"):
        assert k in m
    assert "image_to_text_R@1" in cap.out and "margin_mean" in cap.out
    for name in ("similarity_histograms.png", "modality_projection.png"):
        assert (plots / name).stat().st_size > 1000
    assert not list(out.parent.glob(".*.tmp"))  # no temporary left behind

    # --max-samples and --workers
    out2 = tmp_path / "out2.json"
    rc = main(_model_args(env, "--data", f"{env['shards']}/{{0..2}}.tar", "--max-samples", "7",
                          "--batch-size", "3", "--output", str(out2)))
    assert rc == 0
    m2 = json.loads(out2.read_text())["metrics"]
    assert m2["n_images"] == 7 and m2["n_pairs"] == 14


def test_model_on_csv_and_benchmark_folder(env, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(env["root"])  # CSV image paths are relative (open_clip's convention)
    out = tmp_path / "csv.json"
    rc = main(_model_args(env, "--data", str(env["csv"]), "--output", str(out)))
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["metrics"]["n_pairs"] == 7

    out = tmp_path / "bench.json"
    rc = main(_model_args(env, "--data", str(env["bench"]), "--split", "validation", "--output", str(out)))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "using the only split 'test'" in err
    res = json.loads(out.read_text())
    assert res["metrics"]["n_images"] == 6 and res["split"] == "test" and res["dataset"] == "wds/bench"


def test_hub_format_config_model(env, tmp_path, capsys):
    out = tmp_path / "wide.json"
    rc = main(["eval", "--model", "geomtest-wide", "--model-config", str(env["hub"]), "--pretrained",
               str(env["wide"]), "--device", "cpu", "--data", f"{env['shards']}/0.tar", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["metrics"]["n_images"] == 4


def test_embeddings_npz_and_pt(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    npz = tmp_path / "emb.npz"
    np.savez(npz, image=img, text=txt, logit_scale=np.float64(12.0), logit_bias=np.float64(-3.0))
    out = tmp_path / "o.json"
    assert main(["eval", "--embeddings", str(npz), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    want = geometry_metrics(img, txt, logit_scale=12.0, logit_bias=-3.0)
    assert res["dataset"] == "embeddings/emb" and res["dataset_path"] == str(npz)
    assert res["model"] == "embeddings" and res["pretrained"] == "emb.npz"
    for k, v in want.items():
        assert res["metrics"][k] == pytest.approx(v, rel=1e-12, abs=1e-15), k

    pt = tmp_path / "emb.pt"
    torch.save({"image": torch.tensor(img), "text": torch.tensor(txt)}, pt)
    out = tmp_path / "p.json"
    assert main(["eval", "--embeddings", str(pt), "--output", str(out), "--chunk-size", "7"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert "logit_scale" not in m and m["n_pairs"] == 30
    assert m["margin_trimmed"] == pytest.approx(want["margin_trimmed"], rel=1e-12)


class _Opaque:
    pass


def _bad_cases(env, tmp: Path):
    """(name, argv, expected message fragment) of every input the command must refuse."""
    shards = env["shards"]
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    _write_tar(corrupt / "0.tar", _samples(0, 2))
    (corrupt / "1.tar").write_bytes(b"this is not a tar archive " * 40)
    empty = tmp / "empty"
    empty.mkdir()
    _write_tar(empty / "0.tar", [])
    rng = np.random.default_rng(1)
    np.savez(tmp / "noarrays.npz", img=rng.normal(size=(4, 3)), txt=rng.normal(size=(4, 3)))
    np.savez(tmp / "pickled.npz", image=np.array([{"a": 1}] * 4, dtype=object), text=rng.normal(size=(4, 3)))
    torch.save({"image": torch.zeros(4, 3), "text": torch.zeros(4, 3), "meta": _Opaque()}, tmp / "pickled.pt")
    np.savez(tmp / "shapes.npz", image=rng.normal(size=(5, 3)), text=rng.normal(size=(4, 3)))
    state = torch.load(env["ckpt"], weights_only=True)
    torch.save({**state, "args": _Opaque()}, tmp / "pickled_ckpt.pt")
    torch.save({"image": torch.zeros(4, 3), "text": torch.zeros(4, 3), "meta": _Opaque()}, tmp / "legacy.pt",
               _use_new_zipfile_serialization=False)
    (tmp / "garbage.pt").write_bytes(b"not a torch file " * 10)
    cut = tmp / "cut"
    cut.mkdir()
    _write_tar(cut / "0.tar", _samples(0, 2))
    with tarfile.open(cut / "0.tar") as tf:
        last = tf.getmembers()[-1]
    with open(cut / "0.tar", "r+b") as f:  # cut inside the last member's data
        f.truncate(last.offset_data + last.size // 2)
    badimg = tmp / "badimg"
    badimg.mkdir()
    _write_tar(badimg / "0.tar", _samples(0, 1) + [("000001", {"png": b"not a png", "txt": b"caption"})])
    nocol = tmp / "nocol.tsv"
    nocol.write_text("path\ttitle\nx.png\tcap\n")
    noimg = tmp / "noimg.tsv"
    noimg.write_text(f"filepath\ttitle\n{tmp / 'nowhere.png'}\tcap\n")
    return [
        ("missing shard", _model_args(env, "--data", f"{shards}/{{0..3}}.tar"), f"missing shard: {shards}/3.tar"),
        ("corrupt shard", _model_args(env, "--data", f"{corrupt}/{{0..1}}.tar"),
         f"corrupt or unreadable shard {corrupt}/1.tar"),
        ("empty dataset", _model_args(env, "--data", f"{empty}/0.tar"), "empty dataset"),
        ("unknown model", ["eval", "--model", "geomtest-tinyy", "--model-config", str(env["cfg"]), "--device", "cpu",
                           "--data", f"{shards}/0.tar"], "unknown model 'geomtest-tinyy': not an open_clip model; did you mean: geomtest-tiny"),
        ("wrong checkpoint", ["eval", "--model", "geomtest-tiny", "--model-config", str(env["cfg"]), "--pretrained",
                              str(env["wide"]), "--device", "cpu", "--data", f"{shards}/0.tar"],
         f"checkpoint {env['wide']} does not fit the architecture of model 'geomtest-tiny'"),
        ("pickled checkpoint", ["eval", "--model", "geomtest-tiny", "--model-config", str(env["cfg"]), "--pretrained",
                                str(tmp / "pickled_ckpt.pt"), "--device", "cpu", "--data", f"{shards}/0.tar"],
         "would need unpickling (test_evaluate._Opaque)"),
        ("npz without arrays", ["eval", "--embeddings", str(tmp / "noarrays.npz")],
         "lacks 'image' and 'text'; it has keys: img, txt"),
        ("pickled npz", ["eval", "--embeddings", str(tmp / "pickled.npz")], "holds pickled objects"),
        ("pickled pt", ["eval", "--embeddings", str(tmp / "pickled.pt")], "would need unpickling"),
        ("mismatched shapes", ["eval", "--embeddings", str(tmp / "shapes.npz")], "same shape"),
        ("no source", ["eval"], "exactly one of --data"),
        ("truncated shard", _model_args(env, "--data", f"{cut}/0.tar"),
         f"corrupt or unreadable shard {cut}/0.tar: ReadError: unexpected end"),
        # the bad sample is found in a worker process and reported as it is
        ("corrupt image", _model_args(env, "--data", f"{badimg}/0.tar", "--workers", "1"),
         f"corrupt sample '000001' in {badimg}/0.tar: its .png is not a readable image"),
        ("csv without the column", _model_args(env, "--data", str(nocol)), "has no column 'filepath' (--csv-img-key)"),
        ("csv image missing", _model_args(env, "--data", str(noimg)),
         f"row 0: image file not found: {tmp / 'nowhere.png'}"),
        ("legacy pickled pt", ["eval", "--embeddings", str(tmp / "legacy.pt")], "would need unpickling"),
        ("not a torch file", ["eval", "--embeddings", str(tmp / "garbage.pt")], "cannot read"),
    ]


def test_bad_inputs_fail_cleanly(env, tmp_path, capsys):
    for name, argv, fragment in _bad_cases(env, tmp_path):
        out = tmp_path / f"{name.replace(' ', '_')}.json"
        rc = main([*argv, "--output", str(out)])
        err = capsys.readouterr().err
        assert rc != 0, name
        assert "error: " in err and fragment in err, (name, err)
        assert not out.exists(), name
        assert not list(tmp_path.glob(f".{out.name}.*")), name


def test_precision_uses_open_clips_autocast(env, tmp_path, capsys):
    """--precision amp_bf16 encodes under open_clip's bfloat16 autocast: close to fp32, not bit-equal."""
    shards = f"{env['shards']}/{{0..2}}.tar"
    metrics = {}
    for precision in ("fp32", "amp_bf16"):
        out = tmp_path / f"{precision}.json"
        rc = main(_model_args(env, "--data", shards, "--precision", precision, "--output", str(out)))
        assert rc == 0, capsys.readouterr().err
        metrics[precision] = json.loads(out.read_text())["metrics"]
    fp32, bf16 = metrics["fp32"]["margin_mean"], metrics["amp_bf16"]["margin_mean"]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=2e-2)
    assert metrics["amp_bf16"]["n_images"] == 12

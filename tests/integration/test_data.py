"""Tests of the digit-mosaic dataset: content, layout, and loading through open_clip's own pipelines."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from open_clip_sigrel.tools.data import ensure_digits_dataset, make_digits_dataset

SMALL = {"n_train": 40, "n_val": 24, "shard_size": 16, "seed": 3}
TINY_MODEL = "sigrel-data-test-tiny"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_digits_dataset(tmp_path_factory.mktemp("digits") / "ds", **SMALL)


@pytest.fixture(scope="module")
def source_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images * (255.0 / 16)).astype(np.uint8), d.target


def read_split(split_dir: Path) -> list[tuple[str, bytes, str]]:
    """(key, png bytes, caption) for every sample in the split's shards, in shard order."""
    n = int((split_dir / "nshards.txt").read_text())
    out = []
    for s in range(n):
        with tarfile.open(split_dir / f"{s}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        assert set(members) == {f"{k}.{ext}" for k in keys for ext in ("png", "txt")}
        out += [(k, members[f"{k}.png"], members[f"{k}.txt"].decode()) for k in keys]
    return out


def test_layout_and_info(small: dict) -> None:
    root = Path(small["train_data"]).parent.parent
    assert small["train_data"] == str(root / "train" / "{0..2}.tar")  # 40 samples / 16 per shard
    assert small["val_data"] == str(root / "val" / "{0..1}.tar")
    for split, n_samples, n_shards in (("train", 40, 3), ("val", 24, 2)):
        d = root / split
        assert (d / "nshards.txt").read_text().strip() == str(n_shards)
        assert not (d / "dataset_type.txt").exists()  # clip_benchmark reads it at the root only
        assert sorted(p.name for p in d.glob("*.tar")) == [f"{i}.tar" for i in range(n_shards)]
        assert sum(json.loads((d / "sizes.json").read_text()).values()) == n_samples
        samples = read_split(d)
        assert [k for k, _, _ in samples] == [f"{i:06d}" for i in range(n_samples)]
    assert json.loads((root / "info.json").read_text()) == small
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"  # clip_benchmark's retrieval set
    assert small["train_num_samples"] == 40 and small["val_num_samples"] == 24
    assert (small["digits_per_image"], small["image_size"], small["seed"]) == (4, 32, 3)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_captions_unique_and_images_are_the_real_digits(small: dict, source_digits) -> None:
    images, labels = source_digits
    root = Path(small["train_data"]).parent.parent
    samples = read_split(root / "train") + read_split(root / "val")
    captions = [c for _, _, c in samples]
    assert len(set(captions)) == len(captions) == 64
    arrays = []
    for _, png, caption in samples:
        words = caption.split()
        assert words[0] == "digits" and len(words) == 5 and all(len(w) == 1 and w.isdigit() for w in words[1:])
        img = np.asarray(Image.open(io.BytesIO(png)))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
        arrays.append(img)
        # 2x2 grid of 16x16 cells = 8x8 digits upscaled 2x (nearest): every 2nd pixel is the source.
        for pos, digit in enumerate(int(w) for w in words[1:]):
            r, c = divmod(pos, 2)
            cell = img[r * 16:(r + 1) * 16:2, c * 16:(c + 1) * 16:2, 0]
            match = np.flatnonzero((images == cell).all(axis=(1, 2)))
            assert match.size and digit in labels[match], (caption, pos)
    flat = np.stack(arrays).reshape(len(arrays), -1)
    assert len(np.unique(flat, axis=0)) == len(arrays)  # images differ per sample


def test_deterministic_and_seed_dependent(tmp_path: Path, small: dict) -> None:
    root = Path(small["train_data"]).parent.parent
    again = make_digits_dataset(tmp_path / "again", **SMALL, csv=False)
    assert again["train_csv"] is None and again["val_csv"] is None
    assert not (tmp_path / "again" / "images").exists()
    for split in ("train", "val"):
        for shard in sorted((root / split).glob("*.tar")):
            assert shard.read_bytes() == (tmp_path / "again" / split / shard.name).read_bytes()
    other = make_digits_dataset(tmp_path / "other", **{**SMALL, "seed": 4}, csv=False)
    caps = [c for _, _, c in read_split(Path(other["train_data"]).parent)]
    assert caps != [c for _, _, c in read_split(root / "train")]


def test_csv_files(small: dict) -> None:
    import pandas as pd

    root = Path(small["train_data"]).parent.parent
    df = pd.read_csv(small["train_csv"], sep="\t")
    assert list(df.columns) == ["filepath", "title"] and len(df) == 40
    shard_samples = read_split(root / "train")
    for (key, png, caption), (_, row) in zip(shard_samples, df.iterrows()):
        assert Path(row["filepath"]).is_absolute()
        assert row["filepath"] == str(root / "images" / "train" / f"{key}.png")
        assert Path(row["filepath"]).read_bytes() == png and row["title"] == caption
    assert len(pd.read_csv(small["val_csv"], sep="\t")) == 24


def test_errors_and_overwrite(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the 100 distinct captions"):
        make_digits_dataset(tmp_path / "a", n_train=90, n_val=11, digits_per_image=2)
    with pytest.raises(ValueError, match="n_train"):
        make_digits_dataset(tmp_path / "a", n_train=0)
    assert not (tmp_path / "a").exists()
    make_digits_dataset(tmp_path / "b", n_train=90, n_val=10, digits_per_image=2, csv=False)  # exactly 10**2
    with pytest.raises(FileExistsError, match="not empty"):
        make_digits_dataset(tmp_path / "b", n_train=5, n_val=5)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        ensure_digits_dataset(tmp_path / "foreign", n_train=5, n_val=5)
    info = make_digits_dataset(tmp_path / "b", n_train=5, n_val=0, csv=False, overwrite=True)
    assert info["val_data"] is None and not (tmp_path / "b" / "val").exists()
    assert info["train_num_samples"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "foreign"]  # no temp dirs left


def test_ensure_reuses_or_rebuilds(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    first = ensure_digits_dataset(out, n_train=8, n_val=4, csv=False)
    stamp = (out / "train" / "0.tar").stat().st_mtime_ns
    assert ensure_digits_dataset(out, n_train=8, n_val=4, csv=False) == first
    assert (out / "train" / "0.tar").stat().st_mtime_ns == stamp  # not rebuilt
    second = ensure_digits_dataset(out, n_train=8, n_val=4, csv=False, seed=1)  # other params: rebuilt
    assert second["seed"] == 1 and json.loads((out / "info.json").read_text()) == second


def test_default_build_is_fast(tmp_path: Path) -> None:
    import time

    t0 = time.perf_counter()
    info = make_digits_dataset(tmp_path / "default")
    assert time.perf_counter() - t0 < 5.0
    assert info["train_data"].endswith("train/{0..3}.tar") and info["val_data"].endswith("val/0.tar")
    assert (info["train_num_samples"], info["val_num_samples"]) == (2048, 512)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    open_clip = pytest.importorskip("open_clip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("cfg") / f"{TINY_MODEL}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    _, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(TINY_MODEL)
    return preprocess_train, preprocess_val, open_clip.get_tokenizer(TINY_MODEL)


def _open_clip_data(argv: list[str], tiny_model) -> dict:
    pytest.importorskip("open_clip_train")
    from open_clip_train.data import get_data
    from open_clip_train.params import parse_args

    args = parse_args(argv + ["--batch-size", "8", "--workers", "0"])
    args.distributed, args.world_size, args.rank = False, 1, 0
    preprocess_train, preprocess_val, tokenizer = tiny_model
    return get_data(args, (preprocess_train, preprocess_val), epoch=0, tokenizer=tokenizer)


def _check_batches(data: dict, n_val: int) -> None:
    import torch

    images, texts = next(iter(data["train"].dataloader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert texts.shape == (8, 16) and texts.dtype == torch.long
    val = list(data["val"].dataloader)
    assert sum(b[0].shape[0] for b in val) == n_val
    assert all(b[0].shape[1:] == (3, 32, 32) and b[1].shape[1:] == (16,) for b in val)


def test_webdataset_through_open_clip_pipeline(small: dict, tiny_model) -> None:
    data = _open_clip_data([
        "--train-data", small["train_data"], "--train-num-samples", str(small["train_num_samples"]),
        "--dataset-type", "webdataset",
        "--val-data", small["val_data"], "--val-num-samples", str(small["val_num_samples"]),
    ], tiny_model)
    _check_batches(data, small["val_num_samples"])


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # CsvDataset pins; no GPU here
def test_csv_through_open_clip_pipeline(small: dict, tiny_model) -> None:
    data = _open_clip_data([
        "--train-data", small["train_csv"], "--dataset-type", "csv", "--val-data", small["val_csv"],
    ], tiny_model)
    assert data["train"].dataloader.num_samples == small["train_num_samples"]
    _check_batches(data, small["val_num_samples"])


def test_cli_make_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from open_clip_sigrel.cli import main

    out = tmp_path / "cli"
    argv = ["make-data", "--output", str(out), "--n-train", "20", "--n-val", "10", "--shard-size", "8", "--no-csv"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "info.json").read_text())
    assert info["train_data"] in printed and info["val_data"] in printed
    assert info["train_data"] == str(out / "train" / "{0..2}.tar") and info["train_csv"] is None
    assert main(argv) == 2  # refuses to overwrite
    assert "error:" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--seed", "5"]) == 0
    assert main(["make-data", "--output", str(tmp_path / "x"), "--n-train", "99", "--n-val", "2",
                 "--digits-per-image", "2"]) == 2
    assert "error:" in capsys.readouterr().err

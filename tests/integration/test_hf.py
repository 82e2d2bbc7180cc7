"""`eval --hf-model`: a tiny randomly initialised transformers SiglipModel saved to a temp folder (no hub),
against the same model's embeddings exported to .npz by transformers' own forward (issue 11 point 4)."""
from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from open_clip_sigrel.cli import main

transformers = pytest.importorskip("transformers", reason="the 'hf' extra (transformers)")
pytestmark = pytest.mark.integration

WORDS = ["digits", *map(str, range(10)), "a", "photo", "of", "thing", "second", "caption"]


def _png(i: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(i).integers(0, 255, size=(32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _caption(i: int, j: int) -> str:
    return f"a photo of thing {i % 10} {j}"


def _write_tar(path, samples) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _save_siglip(folder, *, drop=()):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                     model_input_names=["input_ids"])
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = transformers.SiglipConfig(
        text_config={**small, "vocab_size": len(vocab), "max_position_embeddings": 16, "pad_token_id": 0},
        vision_config={**small, "image_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    model = transformers.SiglipModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(9.0))
        model.logit_bias.fill_(-4.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    if drop:
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in state.items() if k not in drop}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub
    root = tmp_path_factory.mktemp("hf")
    ckpt = _save_siglip(root / "siglip")
    data = root / "digits"
    (data / "test").mkdir(parents=True)
    counts = [1, 3, 2, 1, 2, 1, 3]  # several captions per image, one per line (clip_benchmark's convention)
    samples = [(f"{i:06d}", {"png": _png(i), "txt": "\n".join(_caption(i, j) for j in range(c)).encode()})
               for i, c in enumerate(counts)]
    _write_tar(data / "test" / "0.tar", samples[:4])
    _write_tar(data / "test" / "1.tar", samples[4:])
    (data / "test" / "nshards.txt").write_text("2\n")
    (data / "dataset_type.txt").write_text("retrieval\n")
    return {"root": root, "ckpt": ckpt, "data": data, "counts": counts}


def _save_siglip2(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = transformers.Siglip2Config(
        text_config={**small, "vocab_size": len(vocab), "max_position_embeddings": 16, "pad_token_id": 0},
        vision_config={**small, "patch_size": 8, "num_patches": 16})
    torch.manual_seed(1)
    transformers.Siglip2Model(cfg).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                         model_input_names=["input_ids"]).save_pretrained(folder)
    transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(folder)
    return folder


def _export_npz(env, path, ckpt=None):
    """What a user writes by hand today: transformers' own forward, embeddings + t and logit_bias to .npz."""
    from PIL import Image

    ckpt = ckpt or env["ckpt"]
    model = transformers.AutoModel.from_pretrained(ckpt).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(ckpt)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    images = [Image.open(io.BytesIO(_png(i))).convert("RGB") for i in range(len(env["counts"]))]
    captions = [_caption(i, j) for i, c in enumerate(env["counts"]) for j in range(c)]
    owner = np.repeat(np.arange(len(images)), env["counts"])
    with torch.no_grad():
        out = model(**proc(images=images, return_tensors="pt"),
                    input_ids=tok(captions, padding="max_length", max_length=16, return_tensors="pt")["input_ids"])
    np.savez(path, image=out.image_embeds.numpy(), text=out.text_embeds.numpy(), text_image=owner,
             logit_scale=np.float64(model.logit_scale.exp().item()), logit_bias=np.float64(model.logit_bias.item()))


def test_hf_model_equals_its_exported_embeddings(env, tmp_path, capsys):
    out = tmp_path / "hf.json"
    rc = main(["eval", "--hf-model", str(env["ckpt"]), "--data", str(env["data"]), "--device", "cpu",
               "--batch-size", "3", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["model"] == str(env["ckpt"]) and res["pretrained"] == "huggingface"
    assert res["dataset"] == "wds/digits" and res["language"] == "en" and res["split"] == "test"
    m = res["metrics"]
    assert m["n_images"] == 7 and m["n_pairs"] == sum(env["counts"])
    assert m["logit_scale"] == pytest.approx(9.0, rel=1e-6) and m["logit_bias"] == pytest.approx(-4.5, rel=1e-6)

    npz = tmp_path / "export.npz"
    _export_npz(env, npz)
    out2 = tmp_path / "npz.json"
    assert main(["eval", "--embeddings", str(npz), "--output", str(out2)]) == 0
    want = json.loads(out2.read_text())["metrics"]
    assert want.keys() == m.keys()
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_siglip2_model_equals_its_exported_embeddings(env, tmp_path, capsys):
    """Siglip2's processor gives pixel_values, pixel_attention_mask and spatial_shapes: all reach the model."""
    ckpt = _save_siglip2(tmp_path / "siglip2")
    out = tmp_path / "hf2.json"
    rc = main(["eval", "--hf-model", str(ckpt), "--data", str(env["data"]), "--device", "cpu", "--batch-size", "3",
               "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    got = json.loads(out.read_text())["metrics"]
    npz = tmp_path / "export2.npz"
    _export_npz(env, npz, ckpt)
    assert main(["eval", "--embeddings", str(npz), "--output", str(tmp_path / "npz2.json")]) == 0
    want = json.loads((tmp_path / "npz2.json").read_text())["metrics"]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_hf_checkpoint_without_logit_bias_is_refused(env, tmp_path, capsys):
    ckpt = _save_siglip(tmp_path / "nobias", drop=("logit_bias",))
    out = tmp_path / "o.json"
    rc = main(["eval", "--hf-model", str(ckpt), "--data", str(env["data"]), "--device", "cpu", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "has no logit_bias" in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--hf-model", "/nowhere/at/all"], "neither a checkpoint folder nor a hub name"),
    (["--model", "not-a-model-anywhere"], "not an open_clip model"),
])
def test_unknown_model_names_are_clear_errors(env, tmp_path, capsys, argv, fragment):
    out = tmp_path / "o.json"
    rc = main(["eval", *argv, "--data", str(env["data"]), "--device", "cpu", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize("txt, fragment", [(b"", "has no caption"), (b"one\n\nthree", "has a blank caption (line 2")])
def test_image_without_captions_is_a_clear_error(env, tmp_path, capsys, txt, fragment):
    data = tmp_path / "bad"
    (data / "test").mkdir(parents=True)
    _write_tar(data / "test" / "0.tar", [("000000", {"png": _png(0), "txt": b"a photo"}),
                                         ("000001", {"png": _png(1), "txt": txt})])
    (data / "test" / "nshards.txt").write_text("1\n")
    out = tmp_path / "o.json"
    rc = main(["eval", "--hf-model", str(env["ckpt"]), "--data", str(data), "--device", "cpu", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"sample '000001' in {data}/test/0.tar {fragment}" in err, err
    assert not out.exists()

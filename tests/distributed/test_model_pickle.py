"""A sigrel model is a plain open_clip model with hooks: it pickles, deep-copies, and survives FSDP2's
fully_shard (which swaps the class itself), with t, b_rel and the forward's bias intact."""
import copy
import io
import json
import pickle
import subprocess
import sys

import open_clip
import pytest
import torch

from open_clip_sigrel.bias import logit_bias_from_rel_bias
from open_clip_sigrel.configs import register_shipped_configs
from open_clip_sigrel.model import enable_rel_bias, has_rel_bias


def _trained_model(custom_text=False):
    """A sigrel model after one optimizer step, so t and b_rel are no longer their initial values."""
    register_shipped_configs()
    model = open_clip.create_model("sigrel-tiny", output_dict=True, force_custom_text=custom_text)
    enable_rel_bias(model, rel_bias=0.3, logit_scale=12.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(*_inputs())
    (out["logit_bias"] + (out["image_features"] * out["text_features"]).sum()).backward()
    opt.step()
    opt.zero_grad()
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=g), torch.randint(1, 1000, (3, 16), generator=g)


def _torch_save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # our own object, in a test: a whole pickled model


COPIES = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save_load,
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("custom_text", [False, True])
@pytest.mark.parametrize("how", list(COPIES))
def test_copy_round_trips_t_b_rel_and_the_forward(how, custom_text):
    model = _trained_model(custom_text)
    t, b = model.logit_scale.detach().double().exp(), model.rel_bias.detach().double()
    assert abs(b.item() - 0.3) > 1e-4 and abs(t.item() - 12.0) > 1e-4  # the step moved them
    clone = COPIES[how](model)
    assert type(clone) is type(model) and has_rel_bias(clone) and clone is not model
    assert torch.equal(clone.rel_bias, model.rel_bias) and torch.equal(clone.logit_scale, model.logit_scale)
    assert clone.rel_bias.requires_grad
    with torch.no_grad():
        want, got = model(*_inputs()), clone(*_inputs())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    direct = logit_bias_from_rel_bias(b, t)  # float64, from the parameters
    assert got["logit_bias"].double().item() == pytest.approx(direct.item(), rel=1e-6)
    assert set(clone.state_dict()) == set(model.state_dict()) and "rel_bias" not in clone.state_dict()


def test_copy_owns_its_hooks():
    """The copy's hooks act on the copy: training it or loading into it leaves the original alone."""
    model = _trained_model()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.rel_bias.fill_(0.9)
    assert clone(*_inputs())["logit_bias"].item() == pytest.approx(-clone.logit_scale.exp().item() * 0.9, rel=1e-6)
    assert model(*_inputs())["logit_bias"].item() == pytest.approx(
        -model.logit_scale.exp().item() * model.rel_bias.item(), rel=1e-6)
    b0 = model.rel_bias.item()
    sd = {**model.state_dict(), "logit_bias": torch.tensor(-clone.logit_scale.exp().item() * 0.25)}
    sd["logit_scale"] = clone.logit_scale.detach().clone()
    clone.load_state_dict(sd)
    assert clone.rel_bias.item() == pytest.approx(0.25, rel=1e-6) and model.rel_bias.item() == b0
    assert pickle.loads(pickle.dumps(clone)).rel_bias.item() == pytest.approx(0.25, rel=1e-6)


FSDP_SCRIPT = r"""
import json, os
import torch, torch.distributed as dist, open_clip
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from open_clip_sigrel.configs import register_shipped_configs
from torch.distributed.tensor import DTensor
from open_clip_sigrel.model import enable_rel_bias, has_rel_bias

dist.init_process_group("gloo", init_method="file://" + os.path.abspath("pg_init"), rank=0, world_size=1)
register_shipped_configs()
model = enable_rel_bias(open_clip.create_model("sigrel-tiny", output_dict=True), rel_bias=0.3, logit_scale=12.0)
cls_before = type(model).__name__
for name in ("logit_scale", "rel_bias"):  # FSDP2 shards no 0-d parameter: open_clip 4.x re-creates them as [1]
    p = getattr(model, name)
    setattr(model, name, torch.nn.Parameter(p.data.unsqueeze(0), requires_grad=p.requires_grad))
mesh = init_device_mesh("cpu", (1,))
for block in model.visual.transformer.resblocks:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
sharded = isinstance(model.rel_bias, DTensor) and isinstance(model.logit_scale, DTensor)
g = torch.Generator().manual_seed(0)
img, txt = torch.randn(3, 3, 32, 32, generator=g), torch.randint(1, 1000, (3, 16), generator=g)
out = model(img, txt)
out["logit_bias"].sum().backward()
t = model.logit_scale.full_tensor().double().exp().item()
b = model.rel_bias.full_tensor().double().item()
grads = [model.rel_bias.grad.full_tensor().sum().item(), model.logit_scale.grad.full_tensor().sum().item()]
opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
sd = get_model_state_dict(model, options=opts)
keys_stock = "rel_bias" not in sd and "logit_bias" in sd
sd_bias = sd["logit_bias"].double().sum().item()
sd["logit_bias"] = torch.full_like(sd["logit_bias"], -t * 0.55)  # load a different b_rel back
set_model_state_dict(model, sd, options=opts)
b_loaded = model.rel_bias.full_tensor().sum().item()
with torch.no_grad():
    after = model(img, txt)["logit_bias"]
print(json.dumps({
    "cls_before": cls_before, "cls_after": type(model).__name__, "has_rel_bias": has_rel_bias(model),
    "sharded": sharded, "bias_type": type(out["logit_bias"]).__name__,
    "bias": out["logit_bias"].double().sum().item(), "t": t, "b": b,
    "grad_rel": grads[0], "grad_scale": grads[1],
    "keys_stock": keys_stock, "saved_bias": sd_bias,
    "b_loaded": b_loaded, "bias_after": after.double().sum().item(),
}))
dist.destroy_process_group()
"""


def test_fully_shard_keeps_the_hooks_and_the_bias(tmp_path):
    """FSDP2 (CPU, gloo, world size 1) swaps the class to FSDP<cls>; the hooks still derive -t * b_rel from the
    unsharded parameters, backward reaches both scalars, and DCP's full state dict carries stock keys."""
    result = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["cls_before"] == "CLIP" and r["cls_after"] == "FSDPCLIP" and r["has_rel_bias"]
    assert r["sharded"] and r["bias_type"] == "Tensor"  # sharded parameters, a plain bias in the forward
    assert (r["t"], r["b"]) == (pytest.approx(12.0, rel=1e-6), pytest.approx(0.3, rel=1e-6))
    assert r["bias"] == pytest.approx(-r["t"] * r["b"], rel=1e-6)
    assert r["grad_rel"] == pytest.approx(-r["t"], rel=1e-5)  # d(-t b)/d b
    assert r["grad_scale"] == pytest.approx(-r["t"] * r["b"], rel=1e-5)  # d(-t b)/d log t
    assert r["keys_stock"] and r["saved_bias"] == pytest.approx(-r["t"] * r["b"], rel=1e-6)
    assert r["b_loaded"] == pytest.approx(0.55, rel=1e-5) and r["bias_after"] == pytest.approx(-r["t"] * 0.55,
                                                                                                rel=1e-5)

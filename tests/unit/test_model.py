"""The model extension (trainable rel_bias, derived logit_bias, no class swap) and the pure state-dict
conversions rel_bias <-> logit_bias. Runs on open_clip 3.3.0 and 4.x alike."""
import math

import open_clip
import pytest
import torch

from open_clip_sigrel.configs import register_shipped_configs
from open_clip_sigrel.model import (
    enable_rel_bias,
    from_open_clip_state_dict,
    has_rel_bias,
    logit_bias,
    sigrel_values,
    to_open_clip_state_dict,
)

MODEL_CLASSES = {False: open_clip.CLIP, True: open_clip.CustomTextCLIP}


def _tiny(custom_text=False, **kw):
    register_shipped_configs()
    return open_clip.create_model("sigrel-tiny", output_dict=True, force_custom_text=custom_text, **kw)


def _inputs(n=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 1000, (n, 16), generator=g)


@pytest.mark.parametrize("custom_text", [False, True])
def test_rel_bias_is_a_parameter_and_logit_bias_is_derived(custom_text):
    model = enable_rel_bias(_tiny(custom_text), rel_bias=0.3, logit_scale=20.0)
    names = dict(model.named_parameters())
    assert "rel_bias" in names and "logit_bias" not in names and has_rel_bias(model)
    assert type(model) is MODEL_CLASSES[custom_text]  # the class is not swapped
    out = model(*_inputs())
    torch.testing.assert_close(out["logit_bias"], torch.tensor(-20.0 * 0.3), rtol=1e-6, atol=1e-6)
    out["logit_bias"].backward()  # gradient reaches both scalars: d(-t b)/d b = -t, d/d log t = -t b
    assert model.rel_bias.grad.item() == pytest.approx(-20.0, rel=1e-5)
    assert model.logit_scale.grad.item() == pytest.approx(-6.0, rel=1e-5)


def test_tuple_output_and_get_logits_carry_the_derived_bias():
    model = enable_rel_bias(_tiny(), rel_bias=0.4, logit_scale=15.0)
    model.output_dict = False
    img, txt = _inputs()
    image_features, text_features, t, bias = model(img, txt)
    assert bias.item() == pytest.approx(-15.0 * 0.4, rel=1e-6)
    bias.backward()
    assert model.rel_bias.grad.item() == pytest.approx(-15.0, rel=1e-5)
    with torch.no_grad():
        logits, _ = model.get_logits(img, txt)  # open_clip reads model.logit_bias outside forward
    s = image_features.detach() @ text_features.detach().T
    torch.testing.assert_close(logits, t.detach() * (s - 0.4), rtol=1e-5, atol=1e-5)


def test_outside_forward_logit_bias_is_the_last_forwards_value_and_holds_no_graph():
    model = enable_rel_bias(_tiny(), rel_bias=0.5, logit_scale=10.0)
    opt = torch.optim.SGD([model.rel_bias, model.logit_scale], lr=0.01)
    out = model(*_inputs())
    out["logit_bias"].backward()
    opt.step()
    assert not model.logit_bias.requires_grad and model.logit_bias.grad_fn is None
    assert model.logit_bias.item() == pytest.approx(out["logit_bias"].item())  # before the step
    t, b = model.logit_scale.exp().item(), model.rel_bias.item()
    assert logit_bias(model).item() == pytest.approx(-t * b, rel=1e-6)  # now
    assert sigrel_values(model) == pytest.approx({"logit_scale": t, "rel_bias": b, "logit_bias": -t * b}, rel=1e-6)
    assert model(*_inputs())["logit_bias"].item() == pytest.approx(-t * b, rel=1e-6)


def test_state_dict_has_exactly_stock_keys_and_round_trips():
    model = enable_rel_bias(_tiny(), rel_bias=0.37, logit_scale=42.0)
    stock = _tiny()  # the same config built by stock open_clip (init_logit_bias in model_cfg)
    sd = model.state_dict()
    assert set(sd) == set(stock.state_dict())
    assert sd["logit_bias"].item() == pytest.approx(-42.0 * 0.37, rel=1e-6)
    stock.load_state_dict(sd, strict=True)
    fresh = enable_rel_bias(_tiny(), rel_bias=0.0)
    fresh.load_state_dict(sd, strict=True)
    assert fresh.rel_bias.item() == pytest.approx(0.37, rel=1e-6)
    assert fresh.logit_scale.exp().item() == pytest.approx(42.0, rel=1e-6)
    assert fresh.logit_bias.item() == pytest.approx(-42.0 * 0.37, rel=1e-6)  # refreshed by the load


def test_state_dict_is_the_pure_conversion_of_the_raw_tensors():
    model = enable_rel_bias(_tiny(), rel_bias=0.21, logit_scale=33.0)
    persistent = set(_tiny().state_dict())  # stock keys: the parameters and persistent buffers
    raw = {k: v.detach() for k, v in model.named_parameters()}
    raw.update({k: v for k, v in model.named_buffers() if k in persistent and k != "logit_bias"})  # ours: derived
    sd = model.state_dict()
    want = to_open_clip_state_dict(raw)
    assert set(sd) == set(want)
    for k in sd:
        torch.testing.assert_close(sd[k], want[k], rtol=0, atol=0)


def test_wrapped_model_state_dict_keeps_the_prefix():
    model = enable_rel_bias(_tiny(), rel_bias=0.6, logit_scale=12.0)
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP's state dict looks like
    sd = wrapper.state_dict()
    assert "module.logit_bias" in sd and "module.rel_bias" not in sd
    assert sd["module.logit_bias"].item() == pytest.approx(-12.0 * 0.6, rel=1e-6)
    other = torch.nn.Module()
    other.module = enable_rel_bias(_tiny(), rel_bias=0.0)
    other.load_state_dict(sd, strict=True)
    assert other.module.rel_bias.item() == pytest.approx(0.6, rel=1e-6)


def test_init_from_existing_bias_and_freezing():
    model = _tiny()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(117.8))
        model.logit_bias.fill_(-12.9)
    enable_rel_bias(model, fixed_rel_bias=True, fixed_logit_scale=True)
    assert model.rel_bias.item() == pytest.approx(12.9 / 117.8, rel=1e-6)  # b_rel = -logit_bias / t = +0.11
    assert not model.rel_bias.requires_grad and not model.logit_scale.requires_grad


def test_model_without_a_bias_gets_b_rel_one():
    register_shipped_configs()
    model = open_clip.create_model("sigrel-tiny", output_dict=True, init_logit_bias=None)
    model.logit_bias = None  # a CLIP model
    enable_rel_bias(model)
    assert model.rel_bias.item() == 1.0 and model(*_inputs())["logit_bias"].item() == pytest.approx(-10.0, rel=1e-6)


def test_bad_init_and_double_enable():
    with pytest.raises(ValueError, match="finite"):
        enable_rel_bias(_tiny(), rel_bias=float("nan"))
    with pytest.raises(ValueError, match="> 0"):
        enable_rel_bias(_tiny(), logit_scale=0.0)
    with pytest.raises(ValueError, match="no logit_scale"):
        enable_rel_bias(torch.nn.Linear(2, 2))
    model = enable_rel_bias(_tiny())
    with pytest.raises(ValueError, match="twice"):
        enable_rel_bias(model)


# -- the pure conversions, float64 against the direct formula

LOG_T = math.log(37.5)


def _sd64(prefix="", s=LOG_T, b=0.123456789, shape=()):
    return {
        f"{prefix}visual.proj": torch.arange(6, dtype=torch.float64).reshape(2, 3),
        f"{prefix}logit_scale": torch.full(shape, s, dtype=torch.float64),
        f"{prefix}rel_bias": torch.full(shape, b, dtype=torch.float64),
        f"{prefix}text_projection": torch.ones(3, 2, dtype=torch.float64),
    }


def test_to_open_clip_state_dict_matches_the_formula_in_float64():
    sd = _sd64()
    before = {k: v.clone() for k, v in sd.items()}
    out = to_open_clip_state_dict(sd)
    assert list(out) == ["visual.proj", "logit_scale", "logit_bias", "text_projection"]  # same place
    want = -math.exp(LOG_T) * 0.123456789
    assert out["logit_bias"].dtype == torch.float64 and out["logit_bias"].item() == pytest.approx(want, rel=1e-15)
    assert out["visual.proj"] is sd["visual.proj"] and out["logit_scale"] is sd["logit_scale"]
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in sd)  # input untouched


def test_from_open_clip_state_dict_matches_the_formula_and_inverts():
    s, lb = math.log(117.8), -12.9
    sd = {"logit_scale": torch.tensor(s, dtype=torch.float64), "logit_bias": torch.tensor(lb, dtype=torch.float64)}
    out = from_open_clip_state_dict(sd)
    assert set(out) == {"logit_scale", "rel_bias"}
    assert out["rel_bias"].item() == pytest.approx(-lb / math.exp(s), rel=1e-15)
    rng = torch.Generator().manual_seed(1)
    for _ in range(20):
        s, b = float(torch.rand((), generator=rng) * 6), float(torch.randn((), generator=rng))
        back = from_open_clip_state_dict(to_open_clip_state_dict(_sd64(s=s, b=b)))
        assert back["rel_bias"].item() == pytest.approx(b, rel=1e-14, abs=1e-15)


def test_conversion_finds_prefixes_and_keeps_dtype_and_shape():
    out = to_open_clip_state_dict(_sd64("module.", shape=(1,)))
    assert "module.logit_bias" in out and "module.rel_bias" not in out and out["module.logit_bias"].shape == (1,)
    both = {**_sd64(), **_sd64("module.")}
    assert {"logit_bias", "module.logit_bias"} <= set(to_open_clip_state_dict(both))
    only = to_open_clip_state_dict(both, prefix="module.")
    assert "rel_bias" in only and "module.logit_bias" in only
    sd32 = {"logit_scale": torch.tensor([math.log(10.0)]), "rel_bias": torch.tensor(0.5, dtype=torch.bfloat16)}
    lb = to_open_clip_state_dict(sd32)["logit_bias"]
    assert lb.dtype == torch.bfloat16 and lb.shape == () and lb.item() == -5.0


def test_conversion_errors_name_the_problem():
    with pytest.raises(ValueError, match="no 'rel_bias' key.*checkpoint\\['state_dict'\\]"):
        to_open_clip_state_dict({"state_dict": {}, "epoch": 3})
    with pytest.raises(ValueError, match="'module.rel_bias' has no 'module.logit_scale'"):
        to_open_clip_state_dict({"module.rel_bias": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="both 'logit_bias' and 'rel_bias'"):
        from_open_clip_state_dict({**_sd64(), "logit_bias": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="no 'module.logit_bias'"):
        from_open_clip_state_dict({"logit_bias": torch.tensor(1.0), "logit_scale": torch.tensor(1.0)},
                                  prefix="module.")
    with pytest.raises(TypeError, match="state dict"):
        to_open_clip_state_dict([("rel_bias", torch.tensor(1.0))])

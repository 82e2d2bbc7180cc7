"""The model extension: trainable rel_bias, derived logit_bias, stock-compatible state dicts, configs."""
import json
import math

import open_clip
import pytest
import torch

from open_clip_sigrel.configs import (
    add_model_config,
    get_sigrel_block,
    parse_sigrel_block,
    register_shipped_configs,
)
from open_clip_sigrel.model import enable_rel_bias, has_rel_bias


def _tiny(**kw):
    register_shipped_configs()
    return open_clip.create_model("sigrel-tiny", output_dict=True, **kw)


def test_rel_bias_is_a_parameter_and_logit_bias_is_derived():
    model = enable_rel_bias(_tiny(), rel_bias=0.3, logit_scale=20.0)
    names = dict(model.named_parameters())
    assert "rel_bias" in names and "logit_bias" not in names and has_rel_bias(model)
    assert isinstance(model, open_clip.CLIP)
    torch.testing.assert_close(model.logit_bias, torch.tensor(-20.0 * 0.3), rtol=1e-6, atol=1e-6)
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 16)))
    out["logit_bias"].backward()  # gradient reaches both scalars: d(-t b)/d b = -t, d/d log t = -t b
    assert model.rel_bias.grad.item() == pytest.approx(-20.0, rel=1e-5)
    assert model.logit_scale.grad.item() == pytest.approx(-6.0, rel=1e-5)


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


def test_init_from_existing_bias_and_freezing():
    model = _tiny()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(117.8))
        model.logit_bias.fill_(-12.9)
    enable_rel_bias(model, fixed_rel_bias=True, fixed_logit_scale=True)
    assert model.rel_bias.item() == pytest.approx(12.9 / 117.8, rel=1e-6)  # b_rel = -logit_bias / t = +0.11
    assert not model.rel_bias.requires_grad and not model.logit_scale.requires_grad


def test_bad_init_and_double_enable():
    with pytest.raises(ValueError, match="finite"):
        enable_rel_bias(_tiny(), rel_bias=float("nan"))
    with pytest.raises(ValueError, match="> 0"):
        enable_rel_bias(_tiny(), logit_scale=0.0)
    model = enable_rel_bias(_tiny())
    with pytest.raises(ValueError, match="twice"):
        enable_rel_bias(model)


def test_shipped_configs_carry_the_sigrel_block_and_stay_stock_clean():
    names = register_shipped_configs()
    assert {"sigrel-tiny", "ViT-B-16-sigrel"} <= set(names)
    assert get_sigrel_block("sigrel-tiny")["init_rel_bias"] == 1.0
    cfg = open_clip.get_model_config("ViT-B-16-sigrel")
    assert "sigrel" not in cfg and cfg["init_logit_bias"] == -10.0


def test_user_config_formats(tmp_path):
    tiny = open_clip.get_model_config("sigrel-tiny")
    hub = tmp_path / "my-sigrel.json"
    hub.write_text(json.dumps({"model_cfg": tiny, "sigrel": {"init_rel_bias": 0.5, "fixed_rel_bias": True}}))
    assert add_model_config(hub) == ["my-sigrel"]
    assert get_sigrel_block("my-sigrel") == {"init_rel_bias": 0.5, "fixed_rel_bias": True}
    assert open_clip.create_model("my-sigrel") is not None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**tiny, "sigrel": {}}))
    with pytest.raises(ValueError, match="break stock open_clip"):
        add_model_config(bad)
    with pytest.raises(ValueError, match="unknown sigrel setting"):
        parse_sigrel_block({"init_bias": 1.0})
    with pytest.raises(ValueError, match="must be > 0"):
        parse_sigrel_block({"init_logit_scale": -1.0})
    with pytest.raises(ValueError, match="true or false"):
        parse_sigrel_block({"fixed_rel_bias": 1})

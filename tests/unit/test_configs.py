"""The sigrel block of model configs: one dataclass (SigrelConfig, every scale is t), the shipped JSONs, the
old key names with a deprecation warning, and what the training options read from it."""
import dataclasses
import json
import math
import warnings

import open_clip
import pytest

from open_clip_sigrel.configs import (
    SHIPPED_CONFIG_DIR,
    SigrelConfig,
    add_model_config,
    get_sigrel_config,
    parse_sigrel_block,
    register_shipped_configs,
)


def _hub(tmp_path, name, block):
    register_shipped_configs()
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"model_cfg": open_clip.get_model_config("sigrel-tiny"), "sigrel": block}))
    return path


def _resolved(model, *flags):
    from open_clip_sigrel.cli import train as sigrel_train

    return sigrel_train.parse_args(["--train-data", "x.tar", "--model", model, "--loss", "sigrel", *flags])


def test_shipped_configs_use_the_new_names_and_stay_stock_clean():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated key in what we ship
        for path in sorted(SHIPPED_CONFIG_DIR.glob("*.json")):
            block = json.loads(path.read_text())["sigrel"]
            assert "init_t" in block and "init_logit_scale" not in block and "max_logit_scale" not in block
            parse_sigrel_block(block, str(path))
    names = register_shipped_configs()
    assert {"sigrel-tiny", "ViT-B-16-sigrel"} <= set(names)
    assert get_sigrel_config("sigrel-tiny") == SigrelConfig(init_t=10.0, init_rel_bias=1.0, max_t=100.0)
    assert get_sigrel_config("ViT-B-16-sigrel").max_t == 1000.0
    cfg = open_clip.get_model_config("ViT-B-16-sigrel")
    assert "sigrel" not in cfg and cfg["init_logit_bias"] == -10.0
    # model_cfg's init_logit_scale is log t; the block's init_t is t: the same starting point.
    assert math.exp(cfg["init_logit_scale"]) == pytest.approx(get_sigrel_config("ViT-B-16-sigrel").init_t)


def test_block_reads_into_the_dataclass_with_defaults_for_left_out_keys():
    cfg = parse_sigrel_block({"init_t": 7, "fixed_rel_bias": True})
    assert cfg == SigrelConfig(init_t=7.0, fixed_rel_bias=True) and isinstance(cfg.init_t, float)
    assert cfg.init_rel_bias == SigrelConfig().init_rel_bias and cfg.max_t is None
    assert parse_sigrel_block(cfg.to_dict()) == cfg  # to_dict is the JSON form
    assert parse_sigrel_block({"max_t": math.inf}).max_t == math.inf  # no clamp
    assert get_sigrel_config("no-such-model") == SigrelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.init_t = 3.0


@pytest.mark.parametrize("old,new,value", [("init_logit_scale", "init_t", 25.0), ("max_logit_scale", "max_t", 500.0)])
def test_old_key_is_read_with_a_deprecation_warning_naming_the_new_key(old, new, value):
    with pytest.warns(DeprecationWarning, match=f"sigrel.{old} is deprecated, rename it to {new}"):
        cfg = parse_sigrel_block({old: value}, "old.json")
    assert getattr(cfg, new) == value
    with pytest.raises(ValueError, match=f"old.json: sigrel.{old} and sigrel.{new} .*give only {new}"):
        parse_sigrel_block({old: value, new: value}, "old.json")


@pytest.mark.parametrize(
    "block,message",
    [
        ({"init_bias": 1.0}, "unknown sigrel setting.*init_bias.*known: \\['init_t'"),
        ({"init_t": -1.0}, "sigrel.init_t is t = exp\\(logit_scale\\) and must be > 0"),
        ({"init_t": 0.0}, "must be > 0"),
        ({"init_t": math.inf}, "sigrel.init_t must be finite"),
        ({"init_rel_bias": math.nan}, "sigrel.init_rel_bias must be finite"),
        ({"init_rel_bias": "1"}, "sigrel.init_rel_bias must be a number"),
        ({"init_t": True}, "sigrel.init_t must be a number"),
        ({"fixed_rel_bias": 1}, "sigrel.fixed_rel_bias must be true or false"),
        ({"max_t": 0.5}, "sigrel.max_t .* must be >= 1"),
        ({"max_t": math.nan}, "sigrel.max_t must be finite"),
        ({"init_logit_scale": -2.0}, "sigrel.init_t is t"),  # the old name is checked as the new one
    ],
)
def test_bad_blocks_raise_naming_the_key(block, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=message):
            parse_sigrel_block(block, "my.json")
    if "init_logit_scale" not in block and "init_bias" not in block:
        with pytest.raises(ValueError, match=message.split(" ")[0]):
            SigrelConfig(**block)  # the dataclass checks the same when built directly


def test_user_config_formats(tmp_path):
    hub = _hub(tmp_path, "my-sigrel", {"init_rel_bias": 0.5, "fixed_rel_bias": True})
    assert add_model_config(hub) == ["my-sigrel"]
    assert get_sigrel_config("my-sigrel") == SigrelConfig(init_rel_bias=0.5, fixed_rel_bias=True)
    assert open_clip.create_model("my-sigrel") is not None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**open_clip.get_model_config("sigrel-tiny"), "sigrel": {}}))
    with pytest.raises(ValueError, match="break stock open_clip"):
        add_model_config(bad)
    with pytest.raises(ValueError, match="not-an-object.json: 'sigrel' must be a JSON object"):
        add_model_config(_hub(tmp_path, "not-an-object", [1.0]))


def test_training_options_read_the_block_and_flags_win(tmp_path):
    add_model_config(_hub(tmp_path, "blocky", {"init_t": 7.5, "init_rel_bias": 0.25, "fixed_logit_scale": True,
                                               "max_t": 50.0}))
    args = _resolved("blocky")
    assert (args.sigrel_init_logit_scale, args.sigrel_init_rel_bias) == (7.5, 0.25)
    assert args.sigrel_fixed_logit_scale and not args.sigrel_fixed_rel_bias and args.sigrel_max_logit_scale == 50.0
    assert not any(args.sigrel_explicit_init.values())  # from the block: a fine-tune keeps the checkpoint's
    args = _resolved("blocky", "--sigrel-init-logit-scale", "20", "--sigrel-max-logit-scale", "inf")
    assert args.sigrel_init_logit_scale == 20.0 and args.sigrel_max_logit_scale == math.inf
    assert args.sigrel_explicit_init["logit_scale"]
    args = _resolved("sigrel-tiny")
    assert (args.sigrel_init_logit_scale, args.sigrel_init_rel_bias) == (10.0, 1.0)


def test_a_config_with_the_old_key_still_trains_the_same_start(tmp_path):
    with pytest.warns(DeprecationWarning, match="rename it to init_t"):
        add_model_config(_hub(tmp_path, "old-style", {"init_logit_scale": 7.5}))
    assert _resolved("old-style").sigrel_init_logit_scale == 7.5

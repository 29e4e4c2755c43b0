from dataclasses import dataclass, field
from typing import Literal

import pytest

from tinygraft.core.config import apply_overrides, from_dict, load_toml, to_dict
from tinygraft.errors import TinygraftError
from tinygraft.models import GPTConfig, get_preset


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    compile: bool = False
    warmup: int | None = None
    schedule: Literal["cosine", "linear"] = "cosine"
    optim: Inner = field(default_factory=Inner)


def test_from_dict_round_trip_and_int_as_float():
    cfg = from_dict(Outer, {"steps": 3, "optim": {"lr": 1, "betas": [0.8, 0.9]}, "schedule": "linear"})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.8, 0.9)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stpes": 3}, "unknown config key 'stpes'"),
        ({"steps": "ten"}, "steps must be int, got 'ten'"),
        ({"steps": True}, "steps must be an integer"),
        ({"compile": 1}, "compile must be true or false"),
        ({"schedule": "step"}, "schedule must be one of 'cosine', 'linear'"),
        ({"optim": {"lrr": 1}}, "unknown optim key 'lrr' for Inner"),
        ({"optim": {"betas": [0.9]}}, "optim.betas must have 2 items"),
    ],
)
def test_from_dict_rejects_by_name(data, message):
    with pytest.raises(TinygraftError, match=message):
        from_dict(Outer, data)


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(Outer(), ["steps=5", "compile=true", "warmup=none", "optim.lr=3e-4", "optim.betas=[0.5,0.6]"])
    assert (cfg.steps, cfg.compile, cfg.warmup, cfg.optim.lr, cfg.optim.betas) == (5, True, None, 3e-4, (0.5, 0.6))
    assert apply_overrides(Outer(), ["warmup=7"]).warmup == 7


@pytest.mark.parametrize(
    "item, message",
    [
        ("nope=1", "unknown config key 'nope'"),
        ("steps=1.5", "steps must be an integer, got '1.5'"),
        ("steps", "must look like key=value"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("name.x=1", "'name' has no sub-keys"),
    ],
)
def test_overrides_reject_by_name(item, message):
    with pytest.raises(TinygraftError, match=message):
        apply_overrides(Outer(), [item])


def test_model_config_validation_surfaces_through_overrides():
    with pytest.raises(TinygraftError, match="head dim"):
        apply_overrides(get_preset("gpt-tiny"), ["n_embd=96"])
    cfg = apply_overrides(get_preset("gpt-tiny"), ["n_layer=2"])
    assert isinstance(cfg, GPTConfig) and cfg.n_layer == 2


def test_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("steps = 4\n[optim]\nlr = 0.01\n")
    assert from_dict(Outer, load_toml(path)).optim.lr == 0.01
    path.write_text("steps = [")
    with pytest.raises(TinygraftError, match="is not valid TOML"):
        load_toml(path)
    with pytest.raises(TinygraftError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")

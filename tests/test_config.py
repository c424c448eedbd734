"""Config plumbing: overrides parse as TOML values, files hold only overrides, types are checked."""

from __future__ import annotations

import pytest

from imagegen.config import apply_overrides, from_dict, load_toml, parse_override
from imagegen.data import DataConfig
from imagegen.errors import ConfigError
from imagegen.train import TrainConfig


def test_parse_override_values():
    assert parse_override("model.width=48") == (["model", "width"], 48)
    assert parse_override("model.loss=hinge") == (["model", "loss"], "hinge")
    assert parse_override("train.ema_decay=0.99") == (["train", "ema_decay"], 0.99)
    assert parse_override("model.spectral_norm=true") == (["model", "spectral_norm"], True)
    for bad in ("nokey", "=3", "a..b=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_overrides_nest_and_later_wins():
    tree = apply_overrides({"train": {"steps": 5}}, ["train.steps=7", "model.width=3"])
    assert tree == {"train": {"steps": 7}, "model": {"width": 3}}


def test_from_dict_checks_types():
    assert from_dict(TrainConfig, {"ema_decay": 0}).ema_decay == 0.0  # ints are fine for floats
    with pytest.raises(ConfigError, match="train.batch_size"):
        from_dict(TrainConfig, {"batch_size": 1.5}, "train")
    with pytest.raises(ConfigError, match="true or false"):
        from_dict(DataConfig, {"strict": "yes"}, "data")
    with pytest.raises(ConfigError, match="data.split"):
        from_dict(DataConfig, {"split": "validation"}, "data")


def test_shipped_config_files_are_valid():
    import pathlib

    import imagegen
    for path in sorted(pathlib.Path(__file__).parent.parent.glob("configs/*.toml")):
        tree = load_toml(path)
        assert "family" in tree, path
        imagegen.resolve_config(tree)

"""AttnResConfig: defaults, validation, dict round trip."""

import pytest

from attnres_compile import AttnResConfig


def test_defaults_follow_the_paper():
    config = AttnResConfig()
    assert (config.num_blocks, config.block_size, config.scale, config.eps) == (8, None, "count", None)
    assert config.layers_per_block(24) == 3
    assert config.layers_per_block(4) == 1  # more blocks than layers: Full AttnRes


def test_block_size_replaces_the_default_num_blocks():
    config = AttnResConfig(block_size=6)
    assert config.num_blocks is None and config.layers_per_block(48) == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_blocks": 0}, "positive int"),
        ({"num_blocks": -3}, "positive int"),
        ({"num_blocks": 2.5}, "positive int"),
        ({"block_size": 0, "num_blocks": None}, "positive int"),
        ({"num_blocks": 8, "block_size": 4}, "not both"),
        ({"num_blocks": None}, "one of num_blocks or block_size"),
        ({"scale": "sum"}, "scale must be one of"),
        ({"eps": 0.0}, "eps must be a positive"),
    ],
)
def test_inconsistent_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttnResConfig(**kwargs)


@pytest.mark.parametrize("config", [AttnResConfig(), AttnResConfig(block_size=3, scale="mean", eps=1e-5)])
def test_dict_round_trip(config):
    assert AttnResConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        AttnResConfig.from_dict({"num_blocks": 4, "blocks": 2})

"""Block partition (design §2, Partition): ceil-sized blocks, the short block last."""

import logging
import math

import pytest

from attnres_compile.config import AttnResConfig
from attnres_compile.passes.partition import partition_blocks


def blocks_of(num_layers, config):
    return partition_blocks(num_layers, num_blocks=config.num_blocks, block_size=config.block_size)


@pytest.mark.parametrize(
    "num_layers, config, blocks",
    [
        # num_blocks=B means block_size = ceil(L / B); the short block goes last
        (8, AttnResConfig(num_blocks=4), ((0, 1), (2, 3), (4, 5), (6, 7))),
        (5, AttnResConfig(num_blocks=2), ((0, 1, 2), (3, 4))),
        (10, AttnResConfig(num_blocks=3), ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9))),
        # ceil can give fewer blocks than asked: 6 layers / 4 -> size 2 -> 3 blocks
        (6, AttnResConfig(num_blocks=4), ((0, 1), (2, 3), (4, 5))),
        (9, AttnResConfig(num_blocks=8), ((0, 1), (2, 3), (4, 5), (6, 7), (8,))),
        # num_blocks=1 keeps one partial over every layer
        (5, AttnResConfig(num_blocks=1), ((0, 1, 2, 3, 4),)),
        (1, AttnResConfig(num_blocks=1), ((0,),)),
        # num_blocks=L is Full AttnRes; above L it clamps to Full AttnRes
        (4, AttnResConfig(num_blocks=4), ((0,), (1,), (2,), (3,))),
        (4, AttnResConfig(), ((0,), (1,), (2,), (3,))),  # default 8 on a 4-layer stream
        (3, AttnResConfig(num_blocks=100), ((0,), (1,), (2,))),
        (1, AttnResConfig(), ((0,),)),
        # the default 8 on 16 and 20 layers
        (16, AttnResConfig(), tuple((2 * i, 2 * i + 1) for i in range(8))),
        (20, AttnResConfig(), ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11), (12, 13, 14), (15, 16, 17), (18, 19))),
        # block_size: layers per block, the last one shorter
        (10, AttnResConfig(block_size=4), ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9))),
        (6, AttnResConfig(block_size=3), ((0, 1, 2), (3, 4, 5))),
        (3, AttnResConfig(block_size=1), ((0,), (1,), (2,))),
        (3, AttnResConfig(block_size=7), ((0, 1, 2),)),
    ],
)
def test_partition_exact(num_layers, config, blocks):
    assert blocks_of(num_layers, config) == blocks


@pytest.mark.parametrize("num_layers", [1, 2, 3, 7, 12, 25, 40])
@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5, 8, 13, 64])
def test_partition_properties(num_layers, num_blocks):
    blocks = blocks_of(num_layers, AttnResConfig(num_blocks=num_blocks))
    size = math.ceil(num_layers / num_blocks)
    assert [i for block in blocks for i in block] == list(range(num_layers))  # consecutive, complete
    assert all(len(b) == size for b in blocks[:-1])
    assert 1 <= len(blocks[-1]) <= size
    assert len(blocks) <= min(num_blocks, num_layers)
    assert isinstance(blocks, tuple) and all(isinstance(b, tuple) for b in blocks)


@pytest.mark.parametrize("num_layers", [0, -1])
def test_partition_of_no_layers_is_an_error(num_layers):
    with pytest.raises(ValueError, match="at least one layer"):
        blocks_of(num_layers, AttnResConfig())


def test_clamp_to_full_attnres_is_logged_not_refused(caplog):
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        assert blocks_of(4, AttnResConfig()) == ((0,), (1,), (2,), (3,))
    assert "Full AttnRes" in caplog.text


def test_fewer_blocks_than_asked_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        assert len(blocks_of(6, AttnResConfig(num_blocks=4))) == 3
    assert "give 3 blocks" in caplog.text and "num_blocks=4" in caplog.text


def test_exact_partition_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        blocks_of(8, AttnResConfig(num_blocks=4))
        blocks_of(10, AttnResConfig(block_size=4))
    assert caplog.text == ""

"""The backend's output equals an independent, hand-written Block AttnRes GPT.

tests/support/handwritten_attnres.py implements design §2 directly in eager
PyTorch, without the project's ops or passes; both read the same random queries.
"""

import pytest
import torch

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig
from handwritten_attnres import block_attnres_logits
from zoo import tiny_gpt


@pytest.mark.parametrize("num_blocks, scale", [(3, "count"), (8, "count"), (1, "mean")])
def test_backend_matches_handwritten_block_attnres(num_blocks, scale):
    model, (idx,), _ = tiny_gpt(n_layer=3)
    attnres_compile.prepare(model, (idx,), AttnResConfig(num_blocks=num_blocks, scale=scale))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        queries = model.attnres.queries[0]
        queries.copy_(torch.randn(queries.shape, generator=gen) / queries.shape[-1] ** 0.5)
    layers = 6
    block_size = -(-layers // num_blocks)
    eps = model.attnres.plan.streams[0].eps
    expected = block_attnres_logits(model, idx, queries.detach(), block_size, eps, scale)
    plain = model.__class__.forward(model, idx)
    got = torch.compile(model, backend=AttnResBackend())(idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, rtol=1e-3, atol=1e-3), "random queries must change the model"

"""Sanity checks of the hand-written Block AttnRes oracle and the example modules.

These test the oracle on its own (zero-init identity, queries matter, bad
input); comparing it with the compiler pass is another test's job.
"""

from __future__ import annotations

import copy

import pytest
import torch

# examples/ and tests/support/ are on sys.path through pytest's `pythonpath` setting.
from handwritten_attnres import attnres_read, block_attnres_logits
from offline_text import FILE_SEPARATOR, batch_iterator, load_corpus, split_train_val
from tiny_gpt import GPTConfig, TinyGPT, loss_fn

CFG = GPTConfig()
N_LAYERS = 2 * CFG.n_layer  # every attention and every MLP is a layer
EPS = 1e-5  # nn.LayerNorm's default, the model's own norm eps


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(CFG).eval()


@pytest.fixture(scope="module")
def idx() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def _random_queries(seed: int = 2) -> torch.Tensor:
    return torch.randn(N_LAYERS + 1, CFG.d_model, generator=torch.Generator().manual_seed(seed))


# --- TinyGPT --------------------------------------------------------------------


def test_tiny_gpt_shapes_and_loss(model, idx):
    logits = model(idx)
    assert logits.shape == (*idx.shape, CFG.vocab_size)
    loss = loss_fn(logits, idx)
    assert loss.shape == ()
    # Small init: the untrained model is close to uniform over 256 bytes.
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


# --- the oracle ------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 2, 3, N_LAYERS])
def test_zero_queries_count_reproduce_model(model, idx, block_size):
    queries = torch.zeros(N_LAYERS + 1, CFG.d_model)
    with torch.no_grad():
        out = block_attnres_logits(model, idx, queries, block_size, EPS, scale="count")
        assert _rel(out, model(idx)) <= 1e-5


@pytest.mark.parametrize("block_size", [1, 3])
def test_random_queries_change_output(model, idx, block_size):
    with torch.no_grad():
        out = block_attnres_logits(model, idx, _random_queries(), block_size, EPS)
        assert _rel(out, model(idx)) > 1e-3


def test_every_query_row_is_used(model, idx):
    # A row the oracle never reads (an off-by-one in the layer order) would
    # leave the output unchanged when perturbed. Row 0 is the exception: the
    # first read has b_0 as its only source, so its softmax is 1 whatever the
    # query.
    base_q = _random_queries()
    with torch.no_grad():
        base = block_attnres_logits(model, idx, base_q, 3, EPS)
        for row in range(N_LAYERS + 1):
            q = base_q.clone()
            q[row] += 1.0
            changed = _rel(block_attnres_logits(model, idx, q, 3, EPS), base) > 1e-6
            assert changed == (row > 0), row


def test_count_matches_mean_for_prenorm_model(model, idx):
    # Every consumer of a read is a LayerNorm, which is scale-invariant but
    # for its eps; with that eps made negligible, "count" (c = n) and "mean"
    # (c = 1, the paper's) must agree at any value of the queries. (At the
    # model's real eps 1e-5 they differ by a few %: the small init makes the
    # stream's variance comparable to the eps.)
    exact = copy.deepcopy(model)
    for m in exact.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-30
    q = _random_queries()
    with torch.no_grad():
        count = block_attnres_logits(exact, idx, q, 2, EPS, scale="count")
        mean = block_attnres_logits(exact, idx, q, 2, EPS, scale="mean")
    assert _rel(mean, count) < 1e-5


def test_gradients_reach_queries(model, idx):
    queries = torch.zeros(N_LAYERS + 1, CFG.d_model, requires_grad=True)
    loss_fn(block_attnres_logits(model, idx, queries, 2, EPS), idx).backward()
    # At zero init the scores' gradient is not zero (the sources differ), so
    # every query learns, except row 0, whose read has a single source.
    grad_norms = queries.grad.norm(dim=-1)
    assert grad_norms[0] == 0
    assert torch.all(grad_norms[1:] > 0)


def test_read_of_one_source_is_that_source():
    v = torch.randn(2, 5, 8)
    assert torch.equal(attnres_read([v], torch.randn(8), EPS, "count"), v)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queries": torch.zeros(N_LAYERS, CFG.d_model)},  # final row missing
        {"block_size": 0},
        {"scale": "sum"},
    ],
)
def test_bad_arguments_raise(model, idx, kwargs):
    args = {"queries": torch.zeros(N_LAYERS + 1, CFG.d_model), "block_size": 2, "scale": "count"} | kwargs
    with pytest.raises(ValueError):
        block_attnres_logits(model, idx, args["queries"], args["block_size"], EPS, scale=args["scale"])


# --- offline_text -------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    return load_corpus(max_bytes=300_000)


def test_load_corpus_is_deterministic(corpus):
    assert corpus.dtype == torch.uint8 and corpus.ndim == 1
    assert 0 < len(corpus) <= 300_000
    assert torch.equal(corpus, load_corpus(max_bytes=300_000))
    # A smaller corpus is a prefix of a larger one: the file order is fixed.
    assert torch.equal(load_corpus(max_bytes=1000), corpus[:1000])


def test_split_train_val_cuts_between_files(corpus):
    train, val = split_train_val(corpus, val_fraction=0.1)
    assert torch.equal(torch.cat([train, val]), corpus)
    assert train[-1] == FILE_SEPARATOR and len(val) > 0
    assert all(torch.equal(a, b) for a, b in zip(split_train_val(corpus, 0.1), (train, val)))


@pytest.mark.parametrize(
    ("ends", "n_train"),
    [
        ([30, 85, 99], 86),  # target 90: nearest boundary is after byte 85
        ([50, 95, 99], 96),  # target 90: the boundary may lie past it
        ([99], 90),  # one file: cut mid-file at the target
    ],
)
def test_split_train_val_picks_nearest_boundary(ends, n_train):
    data = torch.full((100,), ord("a"), dtype=torch.uint8)
    data[ends] = FILE_SEPARATOR
    train, val = split_train_val(data, val_fraction=0.1)
    assert (len(train), len(val)) == (n_train, 100 - n_train)


def test_batch_iterator_shapes_and_shift(corpus):
    B, T = 4, 32
    x, y = next(batch_iterator(corpus, B, T, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (B, T)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Each row of [x, y's last token] is a window of T + 1 corpus bytes.
    windows = corpus.long().unfold(0, T + 1, 1)  # [N - T, T + 1]
    for row in torch.cat([x, y[:, -1:]], dim=1):
        assert (windows == row).all(dim=1).any()


def test_batch_iterator_is_deterministic(corpus):
    def first_two(seed: int) -> list[torch.Tensor]:
        it = batch_iterator(corpus, 3, 16, torch.Generator().manual_seed(seed))
        return [t for _ in range(2) for t in next(it)]

    assert all(torch.equal(a, b) for a, b in zip(first_two(5), first_two(5)))
    assert not torch.equal(first_two(5)[0], first_two(6)[0])

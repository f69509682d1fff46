"""The export path: torch.export → attnres_compile.export.rewrite → run, re-export, save, load."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._pytree import tree_leaves

import attnres_compile
from attnres_compile import AttnResConfig
from attnres_compile.export import PLAN_KEY, rewrite
from attnres_compile.queries import QUERY_PREFIX
from zoo import CAUSAL_LMS, hf_bert, plain_mlp, tiny_gpt

MODELS = sorted(CAUSAL_LMS)  # gpt2, llama, tiny_gpt


def _export(factory):
    model, args, kwargs = factory()
    return model, args, kwargs, torch.export.export(model, args, kwargs, strict=False)


@pytest.fixture(scope="module")
def exported():
    """name → (model, args, kwargs, ExportedProgram), exported once for the whole file."""
    return {name: _export(CAUSAL_LMS[name]) for name in MODELS}


def _tensors(output):
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def _rel_err(out, ref):
    return max(((o - r).abs().max() / r.abs().max()).item() for o, r in zip(_tensors(out), _tensors(ref)))


def _projection_loss(output, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=gen)).sum() for t in _tensors(output) if t.is_floating_point())


def _grads(module, names, args, kwargs):
    module.zero_grad(set_to_none=True)
    out = module(*args, **kwargs)
    _projection_loss(out).backward()
    params = dict(module.named_parameters())
    grads = {name: params[name].grad.clone() for name in names}
    return out, grads


def _query_names(gm):
    return [name for name, _ in gm.named_parameters() if name.startswith(QUERY_PREFIX)]


def _set_random_queries(gm, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in _query_names(gm):
            q = gm.get_parameter(name)
            q.copy_(torch.randn(q.shape, generator=gen))


@pytest.mark.parametrize("name", MODELS)
def test_zero_init_rewrite_reproduces_outputs_and_gradients(name, exported, caplog):
    model, args, kwargs, ep = exported[name]
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        gm = rewrite(ep)
    assert "rewrote exported program" in caplog.text
    plan = gm.meta[PLAN_KEY]
    assert len(plan.streams) == 1 and len(plan.streams[0].layers) == 4  # 2 blocks x (attention, MLP)
    assert _query_names(gm) == [f"{QUERY_PREFIX}0"]
    assert tuple(gm.get_parameter(f"{QUERY_PREFIX}0").shape) == plan.query_shapes[0]

    names = [n for n, _ in model.named_parameters()]
    ref, ref_grads = _grads(model, names, args, kwargs)
    out, grads = _grads(gm, names, args, kwargs)
    err = _rel_err(out, ref)
    print(f"{name}: zero-init max|diff|/max|ref| = {err:.2e}")
    assert err <= 1e-5
    grad_err = {param: _rel_err(grads[param], ref_grads[param]) for param in names}
    worst = max(grad_err, key=grad_err.get)
    print(f"{name}: worst gradient max|diff|/max|ref| = {grad_err[worst]:.2e} ({worst})")
    assert grad_err[worst] <= 1e-5, worst
    query = gm.get_parameter(f"{QUERY_PREFIX}0")
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_random_queries_change_outputs_and_survive_reexport_save_and_load(exported, tmp_path):
    jobs = []
    for name in MODELS:
        model, args, kwargs, ep = exported[name]
        gm = rewrite(ep)
        _set_random_queries(gm)
        with torch.no_grad():
            out = gm(*args, **kwargs)
            assert _rel_err(out, model(*args, **kwargs)) > 1e-3, "the queries must matter"

        again = torch.export.export(gm, args, kwargs, strict=False)
        targets = [n.target for n in again.graph.nodes]
        assert torch.ops.attnres.block_read.default in targets
        assert torch.ops.attnres.read.default in targets
        assert f"{QUERY_PREFIX}0" in again.graph_signature.parameters
        with torch.no_grad():
            rerun = again.module()(*args, **kwargs)
        for a, b in zip(_tensors(rerun), _tensors(out)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

        path = tmp_path / f"{name}.pt2"
        torch.export.save(again, path)
        torch.save({"args": args, "kwargs": kwargs, "expected": _tensors(out)}, tmp_path / f"{name}.io.pt")
        jobs.append(str(path))

    script = textwrap.dedent(
        """
        import sys
        import torch
        import attnres_compile  # registers torch.ops.attnres.*
        import transformers.modeling_outputs  # the HF output classes of the saved out_spec
        from torch.utils._pytree import tree_leaves
        torch.set_num_threads(int(sys.argv[1]))  # the parent's: bitwise equality needs the same reduction order
        for path in sys.argv[2:]:
            ep = torch.export.load(path)
            io = torch.load(path[: -len(".pt2")] + ".io.pt")
            with torch.no_grad():
                out = ep.module()(*io["args"], **io["kwargs"])
            got = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            assert len(got) == len(io["expected"]), path
            for a, b in zip(got, io["expected"]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        print("loaded", len(sys.argv) - 2)
        """
    )
    threads = str(torch.get_num_threads())
    done = subprocess.run([sys.executable, "-c", script, threads, *jobs], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"loaded {len(jobs)}" in done.stdout


@pytest.mark.parametrize("factory", [hf_bert, plain_mlp], ids=["post-norm bert", "plain mlp"])
def test_program_without_a_stream_comes_back_unchanged(factory, caplog):
    model, args, kwargs, ep = _export(factory)
    gm = ep.module()
    code = gm.code
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        result = rewrite(gm)
    assert result is gm and gm.code == code
    assert _query_names(gm) == [] and not gm.meta[PLAN_KEY].streams
    assert "no residual stream in this program" in caplog.text
    if factory is hf_bert:
        assert "post-norm" in caplog.text
    with torch.no_grad():
        assert _rel_err(rewrite(ep)(*args, **kwargs), model(*args, **kwargs)) == 0


def test_rewritten_program_fine_tunes_its_queries(exported):
    model, args, kwargs, ep = exported["tiny_gpt"]
    gm = rewrite(ep)
    query = gm.get_parameter(f"{QUERY_PREFIX}0")
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    targets = torch.randint(0, 64, args[0].shape, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        logits = gm(*args, **kwargs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert query.abs().max() > 1e-3, "the optimizer moved the queries off zero"
    assert losses[-1] < losses[0]


def test_rewriting_twice_changes_nothing(exported, caplog):
    *_, ep = exported["tiny_gpt"]
    gm = rewrite(ep)
    code, params = gm.code, dict(gm.named_parameters())
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        assert rewrite(gm) is gm
    assert gm.code == code and dict(gm.named_parameters()) == params
    assert "already holds Block AttnRes reads" in caplog.text


def test_config_and_initial_queries(exported):
    model, args, kwargs, ep = exported["tiny_gpt"]
    gm = rewrite(ep, AttnResConfig(num_blocks=2, scale="mean"), queries=[torch.full((5, 32), 0.5)])
    plan = gm.meta[PLAN_KEY]
    assert [len(b) for b in plan.streams[0].blocks] == [2, 2]
    assert torch.equal(gm.get_parameter(f"{QUERY_PREFIX}0"), torch.full((5, 32), 0.5))
    with pytest.raises(ValueError, match="queries have shapes"):
        rewrite(ep, queries=[torch.zeros(4, 32)])
    with pytest.raises(TypeError, match="ExportedProgram or an fx.GraphModule"):
        rewrite(model)


class _Caller(torch.nn.Module):
    """Calls a model: torch.export reads ``forward.__code__``, which a prepared model's forward lacks."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def test_prepared_model_keeps_its_queries_and_config_through_export():
    model, args, kwargs = tiny_gpt()
    attnres_compile.prepare(model, args, config=AttnResConfig(num_blocks=2))
    with torch.no_grad():
        model.attnres_queries_0.copy_(torch.randn(model.attnres_queries_0.shape) / 8)
    reference = torch.compile(model, backend=attnres_compile.AttnResBackend(inductor=False))(*args)
    gm = rewrite(torch.export.export(_Caller(model), args, kwargs, strict=False))
    assert [len(b) for b in gm.meta[PLAN_KEY].streams[0].blocks] == [2, 2]  # the prepared config
    queries = [name for name, _ in gm.named_parameters() if QUERY_PREFIX in name]
    assert queries == [f"model.{QUERY_PREFIX}0"]  # the model's own, not a new one
    assert not any(n.target == torch.ops.attnres.bind_queries.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*args), reference, rtol=1e-5, atol=1e-6)

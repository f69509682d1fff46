"""prepare(): trainable zero-init queries on the user's model, or an untouched model with a reason."""

import copy
import io
import logging

import pytest
import torch

import attnres_compile
from attnres_compile import AttnResConfig, AttnResQueries
from zoo import hf_bert, plain_mlp, tiny_gpt


def test_queries_are_parameters_in_state_dict_and_zero():
    model, args, _ = tiny_gpt(n_layer=3)
    before = {id(p) for p in model.parameters()}
    out = attnres_compile.prepare(model, args, AttnResConfig(num_blocks=2))
    assert out is model
    assert isinstance(model.attnres, AttnResQueries)
    (queries,) = model.attnres.queries
    # 3 blocks x (attention + MLP) = 6 residual steps, plus the final read.
    assert queries.shape == (7, 32)
    assert torch.count_nonzero(queries) == 0
    assert queries.requires_grad
    new = [p for p in model.parameters() if id(p) not in before]
    assert len(new) == 1 and new[0] is queries
    keys = [k for k in model.state_dict() if "attnres" in k]
    assert keys == ["attnres_queries_0"]
    plan = model.attnres.plan
    assert [len(b) for b in plan.streams[0].blocks] == [3, 3]


def test_prepare_is_idempotent_and_refuses_a_different_config():
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args, AttnResConfig(num_blocks=2))
    queries = model.attnres.queries[0]
    attnres_compile.prepare(model, args, AttnResConfig(num_blocks=2))
    assert model.attnres.queries[0] is queries
    with pytest.raises(ValueError, match="already prepared"):
        attnres_compile.prepare(model, args, AttnResConfig(num_blocks=1))


def test_prepared_model_runs_eagerly_only_while_queries_are_zero():
    model, args, _ = tiny_gpt()
    reference = copy.deepcopy(model)
    attnres_compile.prepare(model, args)
    torch.testing.assert_close(model(*args), reference(*args), rtol=0, atol=0)
    with torch.no_grad():
        model.attnres.queries[0][1].fill_(0.1)
    with pytest.raises(RuntimeError, match="only computes Block AttnRes when compiled"):
        model(*args)


def test_prepare_keeps_the_random_state():
    model, args, _ = tiny_gpt()
    torch.manual_seed(123)
    attnres_compile.prepare(model, args)
    after_prepare = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_prepare, torch.rand(3))


def test_whole_model_pickles_with_its_queries():
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    with torch.no_grad():
        model.attnres.queries[0].normal_()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.attnres.queries[0], model.attnres.queries[0])
    assert loaded.forward.module is loaded  # the forward wrapper follows its own model
    torch.testing.assert_close(
        torch.compile(loaded, backend="attnres")(*args), torch.compile(model, backend="attnres")(*args)
    )


@pytest.mark.parametrize(
    "factory, why",
    [(plain_mlp, "no residual stream rewritten"), (hf_bert, "raw, with no normalization on the way in")],
)
def test_models_without_a_readable_stream_are_left_untouched(factory, why, caplog):
    model, args, kwargs = factory()
    state = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.INFO, logger="attnres_compile"):
        out = attnres_compile.prepare(model, args, example_kwargs=kwargs)
    assert out is model
    assert not hasattr(model, "attnres")
    assert "forward" not in vars(model)
    assert not any("attnres" in name for name, _ in model.named_parameters())
    assert model.state_dict().keys() == state.keys()
    assert why in caplog.text and "left untouched" in caplog.text


def test_example_inputs_must_be_a_tuple():
    model, args, _ = tiny_gpt()
    with pytest.raises(TypeError, match="tuple"):
        attnres_compile.prepare(model, args[0])


def test_training_a_prepared_model_without_the_rewrite_says_its_queries_get_no_gradient(caplog, monkeypatch):
    """Eagerly, or under another backend (Trainer's torch_compile=True): zero queries, no gradient, a warning."""
    import attnres_compile.queries as queries_module

    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    for backend in ("eager", "aot_eager"):  # aot_eager: another backend that traces the backward
        monkeypatch.setattr(queries_module, "_said_queries_get_no_gradient", False)
        caplog.clear()
        run = model if backend == "eager" else torch.compile(model, backend=backend)
        with caplog.at_level(logging.WARNING, logger="attnres_compile"):
            run(*args).square().mean().backward()
            run(*args).square().mean().backward()
        assert caplog.text.count("training as the plain model") == 1, (backend, caplog.text)
        assert model.attnres.queries[0].grad is None


def test_verify_and_inference_of_a_prepared_model_say_nothing_about_gradients(caplog, monkeypatch):
    import attnres_compile.queries as queries_module

    monkeypatch.setattr(queries_module, "_said_queries_get_no_gradient", False)
    model, args, _ = tiny_gpt()
    attnres_compile.prepare(model, args)
    with caplog.at_level(logging.WARNING, logger="attnres_compile"):
        with torch.no_grad():
            model(*args)
        assert attnres_compile.verify(model, args).ok
    assert "training as the plain model" not in caplog.text

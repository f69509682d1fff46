"""Saving and loading prepared models: state_dict, save_pretrained / from_pretrained, misfit checkpoints."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig
from zoo import hf_gpt2, hf_llama, set_random_queries

CONFIG = AttnResConfig(num_blocks=2)
NO_CACHE = {"use_cache": False}


def _prepared(factory):
    model, args, kwargs = factory()
    attnres_compile.prepare(model, args, CONFIG, example_kwargs=kwargs)
    set_random_queries(model)
    return model.eval(), args


@torch.no_grad()
def _rewritten_logits(model, ids):
    """Logits of the eager Block AttnRes rewrite (the compiled graph, run without Inductor)."""
    return torch.compile(model, backend=AttnResBackend(inductor=False))(ids, use_cache=False).logits


def test_save_pretrained_records_the_config_and_the_queries(tmp_path):
    model, _ = _prepared(hf_llama)
    attnres_compile.save_pretrained(model, tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["attnres"]
    assert AttnResConfig.from_dict(recorded) == CONFIG
    weights = load_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(weights["attnres_queries_0"], model.attnres_queries_0.detach(), rtol=0, atol=0)


def test_save_pretrained_refuses_an_unprepared_model(tmp_path):
    model, _, _ = hf_llama()
    with pytest.raises(TypeError, match="LlamaForCausalLM was not prepared"):
        attnres_compile.save_pretrained(model, tmp_path)


@pytest.mark.parametrize(
    "factory, model_class",
    [(hf_gpt2, GPT2LMHeadModel), (hf_llama, LlamaForCausalLM), (hf_llama, AutoModelForCausalLM)],
)
def test_from_pretrained_restores_config_and_queries(tmp_path, factory, model_class, caplog):
    model, (ids,) = _prepared(factory)
    attnres_compile.save_pretrained(model, tmp_path)
    ignored_before = vars(type(model)).get("_keys_to_ignore_on_load_unexpected", "unset")
    loaded = attnres_compile.from_pretrained(model_class, tmp_path, (ids,), example_kwargs=NO_CACHE)
    assert type(loaded) is type(model) and loaded.attnres.config == CONFIG
    torch.testing.assert_close(loaded.attnres_queries_0, model.attnres_queries_0, rtol=0, atol=0)
    torch.testing.assert_close(_rewritten_logits(loaded.eval(), ids), _rewritten_logits(model, ids), rtol=0, atol=0)
    # transformers must not list the queries as unexpected keys: from_pretrained loads them.
    assert "LOAD REPORT" not in caplog.text
    assert vars(type(model)).get("_keys_to_ignore_on_load_unexpected", "unset") == ignored_before  # restored


_FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import attnres_compile
    from attnres_compile import AttnResBackend, AttnResConfig

    checkpoint, state_dict_file, ids_file, out_file = sys.argv[1:]
    ids = torch.load(ids_file)

    def logits(model):
        with torch.no_grad():
            compiled = torch.compile(model.eval(), backend=AttnResBackend(inductor=False))
            return compiled(ids, use_cache=False).logits

    # 1. save_pretrained / from_pretrained: one call
    loaded = attnres_compile.from_pretrained(LlamaForCausalLM, checkpoint, (ids,), example_kwargs={"use_cache": False})
    torch._dynamo.reset()
    # 2. state_dict: prepare a fresh model with the same config, then load
    fresh = LlamaForCausalLM(LlamaConfig.from_pretrained(checkpoint))
    attnres_compile.prepare(fresh, (ids,), AttnResConfig(num_blocks=2), example_kwargs={"use_cache": False})
    fresh.load_state_dict(torch.load(state_dict_file))
    torch.save({"from_pretrained": logits(loaded), "state_dict": logits(fresh)}, out_file)
    """
)


def test_round_trip_in_a_fresh_process_gives_the_same_outputs(tmp_path):
    model, (ids,) = _prepared(hf_llama)
    attnres_compile.save_pretrained(model, tmp_path / "checkpoint")
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(_FRESH_PROCESS)
    files = [tmp_path / name for name in ("checkpoint", "state_dict.pt", "ids.pt", "out.pt")]
    run = subprocess.run([sys.executable, str(tmp_path / "load.py"), *map(str, files)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    results = torch.load(tmp_path / "out.pt")
    expected = _rewritten_logits(model, ids)
    for route, logits in results.items():
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6, msg=f"{route} round trip")
    # The trained queries matter: the same weights with zero queries give other logits.
    with torch.no_grad():
        for q in model.attnres.queries:
            q.zero_()
    assert (_rewritten_logits(model, ids) - expected).abs().max() > 1e-2


def _saved(tmp_path, factory=hf_llama):
    model, (ids,) = _prepared(factory)
    attnres_compile.save_pretrained(model, tmp_path)
    return ids


def _edit_weights(tmp_path, edit):
    weights = load_file(tmp_path / "model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_queries_of_another_width_name_both_shapes(tmp_path):
    ids = _saved(tmp_path)
    _edit_weights(tmp_path, lambda w: w.update(attnres_queries_0=torch.zeros(5, 16)))
    with pytest.raises(ValueError, match=r"checkpoint \{'attnres_queries_0': \(5, 16\)\}, model \{'attnres_queries_0': \(5, 32\)\}"):
        attnres_compile.from_pretrained(LlamaForCausalLM, tmp_path, (ids,), example_kwargs=NO_CACHE)


def test_checkpoint_with_queries_for_more_layers_names_both_shapes(tmp_path):
    ids = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint \{'attnres_queries_0': \(5, 32\)\}, model \{'attnres_queries_0': \(3, 32\)\}"):
        attnres_compile.from_pretrained(LlamaForCausalLM, tmp_path, (ids,), example_kwargs=NO_CACHE, num_hidden_layers=1)


def test_checkpoint_with_an_extra_stream_names_both(tmp_path):
    ids = _saved(tmp_path)
    _edit_weights(tmp_path, lambda w: w.update(attnres_queries_1=torch.zeros(5, 32)))
    with pytest.raises(ValueError, match=r"'attnres_queries_1': \(5, 32\)\}, model \{'attnres_queries_0': \(5, 32\)\}"):
        attnres_compile.from_pretrained(LlamaForCausalLM, tmp_path, (ids,), example_kwargs=NO_CACHE)


def test_checkpoint_without_queries_is_refused(tmp_path):
    model, (ids,), _ = hf_llama()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no attnres_queries_<k> tensors"):
        attnres_compile.from_pretrained(LlamaForCausalLM, tmp_path, (ids,), example_kwargs=NO_CACHE)


def test_checkpoint_without_a_recorded_config_asks_for_one(tmp_path):
    ids = _saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["attnres"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records no 'attnres' config"):
        attnres_compile.from_pretrained(LlamaForCausalLM, tmp_path, (ids,), example_kwargs=NO_CACHE)
    loaded = attnres_compile.from_pretrained(LlamaForCausalLM, tmp_path, (ids,), CONFIG, example_kwargs=NO_CACHE)
    assert loaded.attnres.config == CONFIG


def test_state_dict_of_another_depth_names_both_shapes():
    model, _ = _prepared(hf_llama)
    small, (ids,), kwargs = hf_llama(n_layer=1)
    attnres_compile.prepare(small, (ids,), CONFIG, example_kwargs=kwargs)
    queries = {"attnres_queries_0": model.state_dict()["attnres_queries_0"]}
    with pytest.raises(RuntimeError, match=r"attnres_queries_0.*\[5, 32\].*\[3, 32\]"):
        small.load_state_dict(queries, strict=False)


def test_sharded_checkpoint_round_trip(tmp_path):
    model, (ids,) = _prepared(hf_llama)
    attnres_compile.save_pretrained(model, tmp_path, max_shard_size="10KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = attnres_compile.from_pretrained(LlamaForCausalLM, tmp_path, (ids,), example_kwargs=NO_CACHE)
    torch.testing.assert_close(loaded.attnres_queries_0, model.attnres_queries_0, rtol=0, atol=0)

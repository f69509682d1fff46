"""generate() on rewritten transformers models: prefill and decode graphs, KV cache, recompiles."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig

VOCAB = 64
CONFIG = AttnResConfig(num_blocks=2)
PROMPT_LENGTHS = (9, 5, 3)  # batch of 3, left padded to 9


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


MODELS = {"gpt2": gpt2, "llama": llama}


def left_padded_prompts(lengths=PROMPT_LENGTHS, seed=1):
    """``input_ids, attention_mask`` of shape ``[len(lengths), max(lengths)]``, padding (id 0) on the left."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def prepared(factory, random_queries: bool):
    model = factory()
    ids, _ = left_padded_prompts()
    attnres_compile.prepare(model, (ids,), CONFIG, example_kwargs={"use_cache": False})
    if random_queries:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for q in model.attnres.queries:
                q.copy_(torch.randn(q.shape, generator=gen) / q.shape[-1] ** 0.5)
    return model


class CountingBackend:
    """Wraps an :class:`AttnResBackend`; records, per compiled graph, whether it was rewritten and its length.

    ``graphs[i]`` is the number of positions the i-th graph's residual stream
    carries (``b_0``'s sequence dimension: the prompt length for the prefill,
    1 for a decode step), or None where the graph was not rewritten.
    """

    def __init__(self, backend: AttnResBackend):
        self.backend = backend
        self.graphs: list = []

    def __call__(self, gm, example_inputs):
        before = len(self.backend.plans)
        compiled = self.backend(gm, example_inputs)
        if len(self.backend.plans) == before:
            self.graphs.append(None)
        else:
            source = self.backend.plans[-1].streams[0].source
            b0 = next(n for n in gm.graph.nodes if n.name == source)
            self.graphs.append(b0.meta["example_value"].shape[-2])
        return compiled


def compiled_in_place(model, backend):
    """``model.compile``: ``generate`` calls the model itself, so the model itself must be compiled."""
    model.compile(backend=backend)
    return model


def greedy(model, ids, mask, tokens, **kwargs):
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
        pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)  # [B, P + T], [B, T, vocab]


def assert_rel_close(got, want, rtol, what):
    rel = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    assert rel <= rtol, f"{what}: max rel error {rel:.2e} > {rtol:g}"
    return rel


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_queries_generate_the_original_models_tokens(name):
    original = MODELS[name]()
    model = prepared(MODELS[name], random_queries=False)
    ids, mask = left_padded_prompts()
    counting = CountingBackend(AttnResBackend(inductor=False))
    want, want_logits = greedy(original, ids, mask, tokens=12)
    got, got_logits = greedy(compiled_in_place(model, counting), ids, mask, tokens=12)
    assert torch.equal(got, want)
    assert_rel_close(got_logits, want_logits, 1e-5, "logits")
    # Every graph generate compiled was rewritten: the prefill (9 positions) and the decode step (1).
    assert None not in counting.graphs and {max(PROMPT_LENGTHS), 1} <= set(counting.graphs), counting.graphs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_decode_equals_a_full_forward_over_the_whole_sequence(name):
    """Per token reads: decode needs the attention KV cache only, no cache of block summaries."""
    model = compiled_in_place(prepared(MODELS[name], random_queries=True), AttnResBackend(inductor=False))
    ids, mask = left_padded_prompts(lengths=(6, 6))
    tokens = 8
    sequences, step_logits = greedy(model, ids, mask, tokens)
    with torch.no_grad():
        full = model(sequences[:, :-1], use_cache=False).logits  # one forward, no cache
    assert_rel_close(step_logits, full[:, ids.shape[1] - 1:], 1e-5, "cached decode vs full forward")
    # The queries are not a no-op here: zero queries give other logits.
    with torch.no_grad():
        for q in model.attnres.queries:
            q.zero_()
        plain = model(sequences[:, :-1], use_cache=False).logits
    assert (plain - full).abs().max() > 1e-2


# Inductor compiles generate's three graphs in about 15 s each on a CPU runner: GPT-2 runs with -m slow
# (its graphs are checked eagerly above in the default run).
@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_compiled_generate_matches_the_eager_rewrite_and_does_not_recompile_per_step(name):
    model = prepared(MODELS[name], random_queries=True)
    reference = compiled_in_place(copy.deepcopy(model), AttnResBackend(inductor=False))
    counting = CountingBackend(AttnResBackend())  # Inductor
    compiled_in_place(model, counting)
    ids, mask = left_padded_prompts()
    tokens = 32

    got, got_logits = greedy(model, ids, mask, tokens)
    want, want_logits = greedy(reference, ids, mask, tokens)
    assert torch.equal(got, want)
    rel = assert_rel_close(got_logits, want_logits, 1e-5, "per-step logits, Inductor vs eager rewrite")
    compiles = len(counting.graphs)
    print(f"{name}: {tokens} tokens, {compiles} compiles {counting.graphs}; logits max rel {rel:.1e}")
    # Prefill, first decode step, then one decode graph with a dynamic cache length for every later step.
    assert None not in counting.graphs and {max(PROMPT_LENGTHS), 1} <= set(counting.graphs), counting.graphs
    assert compiles <= 3, f"{compiles} compiles over {tokens} tokens: decode recompiles per step"

    # Sampling with a fixed seed: reproducible, the same draws as the reference, no further compile.
    def sample(m):
        torch.manual_seed(123)
        return m.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=8,
                          min_new_tokens=8, pad_token_id=0)

    first = sample(model)
    assert torch.equal(first, sample(model))
    assert torch.equal(first, sample(reference))
    assert len(counting.graphs) == compiles


def test_generate_through_the_torch_compile_wrapper_refuses_trained_queries():
    """``torch.compile(model).generate`` calls the plain model: with trained queries that must fail loudly."""
    model = prepared(llama, random_queries=True)
    ids, mask = left_padded_prompts()
    with pytest.raises(RuntimeError, match=r"model.compile\(backend='attnres'\).*generate"):
        torch.compile(model, backend="attnres").generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)

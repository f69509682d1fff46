"""LoRA (``peft``) on a prepared model: rewritten through the adapter branch, exact at zero queries,
the queries train beside the adapters, and both save and load.

The rewritten graphs run eagerly here (``AttnResBackend(inductor=False)``):
what LoRA changes is the graph the detector reads, not the code Inductor
generates for it; ``verify`` (which compiles with Inductor) is the slow test.
"""

import copy
import os
from dataclasses import dataclass, field

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import attnres_compile
import attnres_compile.peft
from attnres_compile import AttnResBackend, AttnResConfig
from attnres_compile.hf import compile_for_trainer
from zoo import VOCAB, hf_llama

CONFIG = AttnResConfig(num_blocks=2)
LAYERS = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)


@pytest.fixture(scope="module")
def prepared():
    """One prepared tiny Llama (``prepare`` traces it once); each test wraps a deep copy."""
    model, args, kwargs = hf_llama(n_layer=LAYERS, seq=8)
    attnres_compile.prepare(model, args, CONFIG, example_kwargs=kwargs)
    return model, args, kwargs


@pytest.fixture
def lora_llama(prepared):
    """The prepared Llama wrapped by LoRA, prepared first (the documented order), with an active adapter.

    ``lora_B`` gets random values: peft initializes it to zero, which would
    leave the adapter's branch without effect on the outputs.
    """
    base, args, kwargs = prepared
    model = get_peft_model(copy.deepcopy(base), lora_config())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model, args, kwargs


def random_queries(model, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in model.attnres.queries:
            q.copy_(torch.randn(q.shape, generator=gen) / q.shape[-1] ** 0.5)


def logits_and_grads(model_fn, model, args, kwargs):
    """Logits and the gradients of every non-query parameter that has one, for a fixed random projection."""
    model.zero_grad(set_to_none=True)
    logits = model_fn(*args, **kwargs).logits
    projection = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (logits * projection).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "attnres_queries" not in n}
    return logits.detach(), grads


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_same_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got, want = got.state_dict(), want.state_dict()
    assert got.keys() == want.keys()
    assert not [k for k in want if not torch.equal(got[k], want[k])]


def trainable_lora_llama(prepared):
    """The documented order: prepare, wrap with LoRA, then let the queries train (peft froze them)."""
    model = get_peft_model(copy.deepcopy(prepared[0]), lora_config())
    for q in model.attnres.queries:
        q.requires_grad_(True)
    return model


@dataclass
class QueriesAtTrainBegin(TrainerCallback):
    """The queries as ``Trainer`` starts its loop (after it loaded a checkpoint it resumes from)."""

    seen: list = field(default_factory=list)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen.append(model.attnres.queries[0].detach().clone())


def train_lora(model, output_dir, max_steps: int, resume_from_checkpoint=None) -> QueriesAtTrainBegin:
    """Trainer, compiled in place, 2 rows a step, a checkpoint every 2 steps with the queries in it."""
    compile_for_trainer(model, backend=AttnResBackend(inductor=False))
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=max_steps, save_steps=2,
        learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True,
    )
    at_begin = QueriesAtTrainBegin()
    trainer = Trainer(
        model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
        callbacks=[attnres_compile.peft.QueriesInCheckpoints(), at_begin],
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return at_begin


def test_peft_freezes_the_queries_and_the_documented_line_trains_them(lora_llama):
    model, _, _ = lora_llama
    assert model.attnres is model.get_base_model().attnres  # PeftModel forwards the attribute to the base model
    assert [q.requires_grad for q in model.attnres.queries] == [False]
    for q in model.attnres.queries:
        q.requires_grad_(True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.attnres_queries_0" in trainable
    assert len(trainable) == 1 + 2 * len(TARGETS) * LAYERS  # the queries and every lora_A / lora_B


def test_lora_model_is_rewritten_and_exact_at_zero_queries(lora_llama):
    model, args, kwargs = lora_llama
    backend = AttnResBackend(inductor=False)
    got = logits_and_grads(torch.compile(model, backend=backend), model, args, kwargs)
    (plan,) = backend.plans
    assert len(plan.streams) == 1 and len(plan.streams[0].layers) == 2 * LAYERS, plan.summary()
    want = logits_and_grads(model, model, args, kwargs)  # eager: the plain model, LoRA included
    assert max_rel(got[0], want[0]) < 1e-5
    assert got[1].keys() == want[1].keys() and len(want[1]) == 2 * len(TARGETS) * LAYERS
    worst = max(max_rel(got[1][n], want[1][n]) for n in want[1])
    assert worst < 1e-5, worst


def test_queries_train_beside_the_adapters_under_trainer_and_resume(prepared, tmp_path):
    model = trainable_lora_llama(prepared)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_lora(model, tmp_path / "run", max_steps=4)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}  # queries and adapters, nothing else
    assert "base_model.model.attnres_queries_0" in moved

    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = trainable_lora_llama(prepared)  # zero queries, fresh adapter
    attnres_compile.peft.load_queries(resumed, checkpoint)  # Trainer reloads the adapter only
    at_begin = train_lora(resumed, tmp_path / "resumed", max_steps=4, resume_from_checkpoint=str(checkpoint))
    with safe_open(os.path.join(checkpoint, attnres_compile.peft.QUERIES_FILE), framework="pt") as f:
        assert torch.equal(at_begin.seen[0], f.get_tensor("attnres_queries_0"))
    torch.testing.assert_close(resumed.attnres.queries[0], model.attnres.queries[0], rtol=1e-5, atol=1e-6)


def test_adapter_and_queries_round_trip(lora_llama, tmp_path):
    model, args, kwargs = lora_llama
    random_queries(model)
    attnres_compile.peft.save_pretrained(model, tmp_path)
    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "attnres" in k]  # peft alone keeps the adapter only

    base, _, _ = hf_llama(n_layer=LAYERS)  # the same seed: the same base weights
    loaded = attnres_compile.peft.from_pretrained(base, tmp_path, args, example_kwargs=kwargs, is_trainable=True)
    assert isinstance(loaded, PeftModel) and loaded.attnres.config == CONFIG
    assert_same_state(loaded, model)
    assert loaded.attnres.queries[0].requires_grad


def test_merged_model_saves_with_attnres_save_pretrained(lora_llama, tmp_path):
    model, args, kwargs = lora_llama
    random_queries(model)
    merged = model.merge_and_unload()  # the prepared base model, LoRA folded into its weights, queries kept
    assert merged.attnres.queries[0].abs().sum() > 0
    attnres_compile.save_pretrained(merged, tmp_path)
    loaded = attnres_compile.from_pretrained(LlamaForCausalLM, tmp_path, args, example_kwargs=kwargs)
    assert_same_state(loaded, merged)


def test_adapter_saved_by_peft_alone_is_refused_with_the_way_out(tmp_path):
    base, args, _ = hf_llama(n_layer=LAYERS)
    model = get_peft_model(base, lora_config())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no attnres_queries.safetensors.*attnres_compile.peft.save_pretrained"):
        attnres_compile.peft.from_pretrained(hf_llama(n_layer=LAYERS)[0], tmp_path, args)
    with pytest.raises(TypeError, match=r"not a peft model.*merge_and_unload"):
        attnres_compile.peft.save_pretrained(model.get_base_model(), tmp_path)


@pytest.mark.slow
def test_verify_passes_on_a_lora_model_with_trainable_queries(lora_llama):
    model, args, kwargs = lora_llama
    for q in model.attnres.queries:
        q.requires_grad_(True)
    report = attnres_compile.verify(model, args, example_kwargs=kwargs)
    assert report.ok, str(report)
    assert any("attnres_queries" in c.name for c in report.comparisons), str(report)

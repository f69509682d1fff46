"""Hugging Face ``Trainer`` trains a prepared model rewritten: compiles, checkpoints, resume, evaluation.

One run of four steps (module fixture) is shared by most tests: two
evaluations of three batches each, a checkpoint every two steps. The model is
compiled in place with :func:`attnres_compile.hf.compile_for_trainer`, as the
README's recipe does. Its rewritten graphs run eagerly
(``AttnResBackend(inductor=False)``): the graphs Dynamo hands the backend, its
guards and the checkpoints do not depend on the code Inductor generates, and
the recipe with Inductor is the slow test.
"""

import json
import os
from dataclasses import dataclass, field

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import attnres_compile
from attnres_compile import AttnResBackend, AttnResConfig
from attnres_compile.hf import compile_for_trainer
from zoo import VOCAB, hf_llama

CONFIG = AttnResConfig(num_blocks=2)
SEQ = 8
BATCH = 2
EVAL_BATCHES = 3
QUERY = "attnres_queries_0"


class TokenRows(torch.utils.data.Dataset):
    """Random token rows, each its own label: an offline causal-LM data set."""

    def __init__(self, rows: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CountingBackend:
    """An :class:`AttnResBackend` that also counts the graphs Dynamo hands it, rewritten or not."""

    def __init__(self, inductor: bool = False):
        self.backend = AttnResBackend(inductor=inductor)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)

    @property
    def rewritten(self) -> int:
        return len(self.backend.plans)


@dataclass
class QueryRecorder(TrainerCallback):
    """Snapshots of the queries (and their gradient) at the events the tests check."""

    at_train_begin: torch.Tensor = None
    after_step: dict = field(default_factory=dict)
    grad_norms: list = field(default_factory=list)
    eval_batches: int = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_train_begin = model.attnres.queries[0].detach().clone()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grad = model.attnres.queries[0].grad
        self.grad_norms.append(0.0 if grad is None else grad.norm().item())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step] = model.attnres.queries[0].detach().clone()

    def on_prediction_step(self, args, state, control, **kwargs):
        self.eval_batches += 1


def prepared_llama():
    model, (ids,), kwargs = hf_llama(n_layer=2, seq=SEQ)
    attnres_compile.prepare(model, (ids,), CONFIG, example_kwargs=kwargs)
    return model, (ids,), kwargs


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH, max_steps=4, learning_rate=1e-2,
        eval_strategy="steps", eval_steps=2, save_steps=2, logging_steps=1, report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(output_dir=str(output_dir), **settings)


def train(model, output_dir, *, resume_from_checkpoint=None, **overrides):
    """Train ``model`` (already compiled in place) for four steps; return the trainer and its recorder."""
    recorder = QueryRecorder()
    trainer = Trainer(
        model=model, args=training_args(output_dir, **overrides), callbacks=[recorder],
        train_dataset=TokenRows(12, seed=0), eval_dataset=TokenRows(BATCH * EVAL_BATCHES, seed=1),
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, recorder


@dataclass
class Run:
    model: torch.nn.Module
    example: tuple
    example_kwargs: dict
    backend: CountingBackend
    recorder: QueryRecorder
    output_dir: str


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    torch._dynamo.reset()
    output_dir = tmp_path_factory.mktemp("trainer")
    model, example, kwargs = prepared_llama()
    backend = CountingBackend()
    compile_for_trainer(model, backend=backend)
    _, recorder = train(model, output_dir)
    return Run(model, example, kwargs, backend, recorder, str(output_dir))


def saved_queries(checkpoint: str) -> torch.Tensor:
    with safe_open(os.path.join(checkpoint, "model.safetensors"), framework="pt") as f:
        return f.get_tensor(QUERY)


def test_trainer_trains_the_rewritten_model_and_its_queries(run):
    plan = run.backend.backend.plans[0]
    assert len(plan.streams[0].layers) == 4, plan.summary()  # 2 decoder layers x (attention, mlp)
    assert len(run.recorder.grad_norms) == 4 and all(g > 0 for g in run.recorder.grad_norms), run.recorder.grad_norms
    assert run.recorder.after_step[4].abs().sum() > 0
    assert not torch.equal(run.recorder.after_step[2], run.recorder.after_step[4])


def test_evaluation_compiles_once_not_per_step(run):
    """The contract: one training graph plus one no-grad evaluation graph, however many evaluation batches run."""
    assert run.recorder.eval_batches == 2 * EVAL_BATCHES
    assert run.backend.graphs == 2, f"{run.backend.graphs} compiles for 4 training steps and 6 evaluation batches"
    assert run.backend.rewritten == 2


def test_checkpoint_holds_the_queries_and_the_config(run):
    checkpoint = os.path.join(run.output_dir, "checkpoint-2")
    assert torch.equal(saved_queries(checkpoint), run.recorder.after_step[2])
    with open(os.path.join(checkpoint, "config.json")) as f:
        assert AttnResConfig.from_dict(json.load(f)["attnres"]) == CONFIG


def test_trainer_checkpoint_loads_with_from_pretrained(run):
    checkpoint = os.path.join(run.output_dir, "checkpoint-4")
    loaded = attnres_compile.from_pretrained(LlamaForCausalLM, checkpoint, run.example, example_kwargs=run.example_kwargs)
    assert loaded.attnres.config == CONFIG
    assert torch.equal(loaded.attnres.queries[0].detach(), run.recorder.after_step[4])


def test_resume_restores_the_queries_and_continues_as_the_uninterrupted_run(run, tmp_path):
    checkpoint = os.path.join(run.output_dir, "checkpoint-2")
    model, _, _ = prepared_llama()  # zero queries: only the checkpoint can give them their trained values
    compile_for_trainer(model, backend=CountingBackend())
    _, resumed = train(model, tmp_path, resume_from_checkpoint=checkpoint, eval_strategy="no")
    assert torch.equal(resumed.at_train_begin, saved_queries(checkpoint))
    assert sorted(resumed.after_step) == [3, 4]
    torch.testing.assert_close(resumed.after_step[4], run.recorder.after_step[4], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_recipe_with_inductor_trains_and_evaluates_on_two_compiles(tmp_path):
    model, _, _ = prepared_llama()
    backend = CountingBackend(inductor=True)
    compile_for_trainer(model, backend=backend)
    _, recorder = train(model, tmp_path)
    assert backend.graphs == 2 and backend.rewritten == 2
    assert recorder.eval_batches == 2 * EVAL_BATCHES
    assert all(g > 0 for g in recorder.grad_norms) and not torch.equal(recorder.after_step[2], recorder.after_step[4])


def test_compile_for_trainer_names_what_is_missing():
    model, _, _ = hf_llama()
    with pytest.raises(TypeError, match=r"attnres_compile.prepare\(model, example_inputs\)"):
        compile_for_trainer(model)
    with pytest.raises(TypeError, match=r"forward signature.*Pass the model itself"):
        compile_for_trainer(torch.compile(model, backend="attnres"))  # checked first: unwrapping is the fix


def test_accelerate_takes_no_custom_backend_name(tmp_path):
    """Why the recipe compiles in place: TrainingArguments' backend goes through accelerate's fixed list."""
    model, _, _ = hf_llama()
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        Trainer(model=model, args=training_args(tmp_path, torch_compile_backend="attnres"))

"""Hugging Face ``transformers`` models: ``generate()``, ``save_pretrained`` and ``from_pretrained``.

Generation
----------
Compile the model *in place* and call ``generate`` on the model itself::

    model = attnres_compile.prepare(model, (example_ids,), example_kwargs={"use_cache": False})
    model.compile(backend="attnres")       # nn.Module.compile: model(...) now runs the rewrite
    tokens = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)

``generate`` calls the model object it belongs to, so the wrapper that
``torch.compile(model)`` returns does not reach it (``compiled.generate`` runs
the plain model; with trained queries that call refuses to run). Dynamo then
compiles and rewrites one graph for the prefill and one or two for the decode
step (one new token, a ``DynamicCache``): the first decode step, then one graph
with a dynamic cache length that serves every later step.

No cache of block summaries is needed. The depth-wise read of Block AttnRes
mixes, for each token, the block summaries *of that token* (``b_n`` at that
position, a per-token RMSNorm key, a softmax over blocks): it never looks
along the sequence. Only the attention branches look back, through the
model's own key/value cache, which the rewrite leaves as it is; a decode step
therefore recomputes its token's block summaries from scratch, exactly as the
full forward over the whole sequence would.

Saving and loading
------------------
The queries are parameters of the model, so ``model.state_dict()`` holds them
(``attnres_queries_<k>``): to restore it, :func:`~attnres_compile.prepare` a
fresh model with the same :class:`AttnResConfig` and ``load_state_dict``. For a
``transformers`` model, :func:`save_pretrained` also records the config in the
model's ``config.json`` (key ``"attnres"``), and :func:`from_pretrained` brings
the whole prepared model back in one call.

Training with ``transformers.Trainer``
--------------------------------------
Compile in place, as for ``generate``, and leave ``TrainingArguments``'
``torch_compile`` off::

    attnres_compile.prepare(model, (example_ids,), example_kwargs={"use_cache": False})
    attnres_compile.hf.compile_for_trainer(model)     # model.compile(backend="attnres") + config.json
    Trainer(model=model, args=TrainingArguments(...), ...).train()

``TrainingArguments(torch_compile_backend=...)`` reaches ``torch.compile``
only through ``accelerate``'s ``DynamoBackend`` enum, which takes its own
list of names (not ``"attnres"``, not a callable), and
``torch_compile=True`` alone picks Inductor, under which a prepared model
trains as the plain model with its queries stuck at zero. Nor can the
wrapper ``torch.compile(model)`` returns be handed over: ``Trainer`` keeps
only the dataset columns named by the forward signature of the model it is
given, and the wrapper's is ``(*args, **kwargs)``. A model compiled in place
stays the ``PreTrainedModel`` itself, so ``Trainer`` neither unwraps nor
re-wraps it, its state dict keeps its keys (the queries included) and its
checkpoints load with :func:`from_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Any, Optional

import torch
from torch import nn

from .config import AttnResConfig
from .prepare import prepare
from .queries import QUERY_PREFIX, AttnResQueries

log = logging.getLogger("attnres_compile")

CONFIG_KEY = "attnres"
"""The key of the :class:`AttnResConfig` (as a dict) in a saved model's ``config.json``."""

_QUERY_KEY = re.compile(rf"^{QUERY_PREFIX}\d+$")
_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"


def _prepared_queries(model: nn.Module, where: str) -> AttnResQueries:
    attnres = getattr(model, "attnres", None)
    if not isinstance(attnres, AttnResQueries):
        raise TypeError(
            f"{where}: {type(model).__name__} was not prepared for Block AttnRes "
            "(call attnres_compile.prepare(model, example_inputs) first)"
        )
    return attnres


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save a prepared ``transformers`` model, queries and config included.

    Records ``model.attnres.config`` in ``model.config`` (key ``"attnres"``, so it
    lands in ``config.json`` and stays for later saves, e.g. a ``Trainer``'s),
    then calls ``model.save_pretrained(save_directory, **kwargs)``; the queries
    ``attnres_queries_<k>`` (``[layers + 1, d]`` fp32 each) are saved with the
    other weights. Load it back with :func:`from_pretrained`.
    """
    attnres = _prepared_queries(model, "save_pretrained")
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"save_pretrained: {type(model).__name__} is not a transformers PreTrainedModel; "
            "save model.state_dict() instead (it holds the queries)"
        )
    record_config(model, attnres.config)
    model.save_pretrained(save_directory, **kwargs)


def record_config(model: nn.Module, config: AttnResConfig) -> None:
    """Write ``config`` into the model's ``transformers`` config (key ``"attnres"``), if it has one.

    Every later ``save_pretrained`` of the model, a ``Trainer`` checkpoint's
    included, then carries it into ``config.json``, where :func:`from_pretrained`
    finds it.
    """
    hf_config = getattr(model, "config", None)
    if hf_config is not None:
        setattr(hf_config, CONFIG_KEY, config.to_dict())


def compile_for_trainer(model: nn.Module, backend: Any = "attnres", **compile_kwargs: Any) -> nn.Module:
    """Compile a prepared model in place so that ``transformers.Trainer`` trains it rewritten.

    Records ``model.attnres.config`` in ``model.config`` (so every checkpoint
    ``Trainer`` saves loads back with :func:`from_pretrained`, no config given)
    and calls ``model.compile(backend=backend, **compile_kwargs)``: the model
    object ``Trainer`` gets is the ``PreTrainedModel`` itself (its forward
    signature, its state-dict keys), and every call of it, training and
    evaluation alike, runs the rewrite. Leave ``TrainingArguments``'
    ``torch_compile`` off. Works the same on a ``peft`` model (whose
    ``attnres`` and ``config`` are those of the model it wraps).

    Expect two compiles in all, the training graph and, at the first
    evaluation, the no-grad graph (plus one more each where the batch shape
    changes, e.g. a short last batch, after which the batch size is dynamic).

    Returns the same ``model``.

    Raises
    ------
    TypeError
        If ``model`` was not prepared, or is the wrapper that ``torch.compile(model)`` returns.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "compile_for_trainer: got the wrapper that torch.compile(model) returns; Trainer keeps only the "
            "dataset columns that the forward signature of its model names, and the wrapper's is (*args, **kwargs), "
            "so every column would be dropped. Pass the model itself (model._orig_mod here): it is compiled in place"
        )
    attnres = _prepared_queries(model, "compile_for_trainer")
    record_config(model, attnres.config)
    model.compile(backend=backend, **compile_kwargs)
    log.info("attnres: %s compiled in place for Trainer with %s", type(model).__name__, attnres)
    return model


def from_pretrained(
    model_class: type,
    path: str | os.PathLike,
    example_inputs: tuple,
    attnres_config: Optional[AttnResConfig] = None,
    *,
    example_kwargs: Optional[dict[str, Any]] = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`: prepared, with its trained queries.

    Parameters
    ----------
    model_class:
        The ``transformers`` class to load with, e.g. ``LlamaForCausalLM`` or
        ``AutoModelForCausalLM``.
    path:
        A local directory written by :func:`save_pretrained` (or by a plain
        ``model.save_pretrained`` of a prepared model, given ``attnres_config``).
    example_inputs, example_kwargs:
        Passed to :func:`~attnres_compile.prepare`, which traces the model once
        to find its residual streams, e.g. ``(torch.zeros(1, 8, dtype=torch.long),)``
        and ``{"use_cache": False}``.
    attnres_config:
        The :class:`AttnResConfig` the model was trained with; default: the one
        recorded in ``config.json``. (Named apart from ``config``, which
        ``transformers`` takes for the model's own configuration.)
    **from_pretrained_kwargs:
        Passed to ``model_class.from_pretrained`` (``dtype``, ``device_map``, ...).

    Returns
    -------
    The prepared model, its ``attnres_queries_<k>`` copied from the checkpoint.
    Compile it with ``model.compile(backend="attnres")`` (for ``generate``) or
    ``torch.compile(model, backend="attnres")``.

    Raises
    ------
    ValueError
        If no config is recorded or given, the checkpoint holds no queries, or
        its queries do not fit the model (the message names both shapes).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(
            f"from_pretrained: {path!r} is not a local directory; download the checkpoint first "
            "(e.g. huggingface_hub.snapshot_download)"
        )
    saved = _read_saved_queries(path)
    with _queries_expected(_concrete_class(model_class, path)):
        model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    config = attnres_config or _recorded_config(model, path)
    prepared = prepare(model, example_inputs, config, example_kwargs=example_kwargs)
    attnres = _prepared_queries(prepared, f"from_pretrained({path!r})")
    _copy_queries(attnres, saved, path)
    record_config(model, config)
    log.info("attnres: loaded %s from %s with %s", type(model).__name__, path, attnres)
    return prepared


def _recorded_config(model: nn.Module, path: str) -> AttnResConfig:
    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if recorded is None:
        raise ValueError(
            f"from_pretrained: {os.path.join(path, 'config.json')} records no {CONFIG_KEY!r} config; "
            "save with attnres_compile.save_pretrained, or pass attnres_config=AttnResConfig(...) as the model was prepared"
        )
    return AttnResConfig.from_dict(dict(recorded))


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (one, or the shards of its index)."""
    index = os.path.join(path, _WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = json.load(f)["weight_map"]
        return sorted({os.path.join(path, shards[k]) for k in shards if _QUERY_KEY.match(k)})
    single = os.path.join(path, _WEIGHTS)
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"from_pretrained: no {_WEIGHTS} or {_WEIGHTS_INDEX} in {path!r}")


def _read_saved_queries(path: str) -> dict[str, torch.Tensor]:
    """``{"attnres_queries_<k>": [rows, d]}`` from the checkpoint's weight files."""
    from safetensors import safe_open

    saved: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            saved.update({k: f.get_tensor(k) for k in f.keys() if _QUERY_KEY.match(k)})
    if not saved:
        raise ValueError(
            f"from_pretrained: the checkpoint in {path!r} holds no {QUERY_PREFIX}<k> tensors: it was not saved "
            "from a prepared model (load it with the model class and call attnres_compile.prepare to start "
            "from zero queries)"
        )
    return saved


def _copy_queries(attnres: AttnResQueries, saved: dict[str, torch.Tensor], path: str) -> None:
    """Copy the checkpoint's queries into the prepared model's, after checking that they fit."""
    expected = {f"{QUERY_PREFIX}{k}": q for k, q in enumerate(attnres.queries)}
    saved_shapes = {k: tuple(v.shape) for k, v in sorted(saved.items())}
    model_shapes = {k: tuple(q.shape) for k, q in expected.items()}
    if saved_shapes != model_shapes:
        raise ValueError(
            f"from_pretrained: the queries in {path!r} do not fit the model: checkpoint {saved_shapes}, "
            f"model {model_shapes} (one [layers + 1, d] matrix per residual stream); the checkpoint was "
            "saved from a model with other layers or width"
        )
    with torch.no_grad():
        for name, query in expected.items():
            query.copy_(saved[name])


def _concrete_class(model_class: type, path: str) -> type:
    """The class an ``AutoModel...`` class would build for ``path`` (other classes: themselves)."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    from transformers import AutoConfig

    try:
        return mapping[type(AutoConfig.from_pretrained(path))]
    except (KeyError, ValueError):
        return model_class  # let from_pretrained raise its own error


@contextlib.contextmanager
def _queries_expected(model_class: type):
    """Let ``model_class.from_pretrained`` pass over the query tensors without a warning.

    The plain class has no ``attnres_queries_<k>`` parameters (``prepare`` adds
    them afterwards, and :func:`from_pretrained` copies them in), so
    ``transformers`` would list them as unexpected keys. Its own class
    attribute for keys to ignore is widened for the duration of the call.
    """
    name = "_keys_to_ignore_on_load_unexpected"
    had_own = name in vars(model_class)
    previous = getattr(model_class, name, None)
    setattr(model_class, name, [*(previous or []), _QUERY_KEY.pattern])
    try:
        yield
    finally:
        if had_own:
            setattr(model_class, name, previous)
        else:
            delattr(model_class, name)

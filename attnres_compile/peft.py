"""LoRA (``peft``) on a prepared model: the order, training the queries, saving them with the adapter.

Prepare the base model first, then wrap it::

    attnres_compile.prepare(model, (example_ids,), example_kwargs={"use_cache": False})
    model = peft.get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", ...))
    for q in model.attnres.queries:   # peft froze them with every other non-adapter parameter
        q.requires_grad_(True)

The queries then stay parameters of the base model (``attnres_queries_<k>``),
which ``merge_and_unload()`` returns with them; ``PeftModel`` forwards the
attributes it lacks to the model it wraps, so ``model.attnres`` and
``model.config`` are the base model's. LoRA's extra branch (``base(x) +
B(A(dropout(x))) * scale``) sits inside each projection, i.e. inside a
residual branch, so the rewrite sees the same residual steps as without it.

``peft``'s own ``save_pretrained`` keeps only the adapter: its
``modules_to_save`` names submodules, and the queries are bare parameters of
the model. :func:`save_pretrained` writes them beside the adapter, with the
:class:`AttnResConfig`, and :func:`from_pretrained` brings both back onto a
fresh base model. For a full model, merge first and use
:func:`attnres_compile.save_pretrained` on the merged model.

``transformers.Trainer`` saves a ``peft`` model's checkpoints with ``peft``,
so they too hold the adapter only, and resuming reloads the adapter only:
:class:`QueriesInCheckpoints` writes the queries into each checkpoint, and
:func:`load_queries` puts them back before ``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import AttnResConfig
from .hf import CONFIG_KEY, _copy_queries, _prepared_queries
from .prepare import prepare
from .queries import QUERY_PREFIX

log = logging.getLogger("attnres_compile")

QUERIES_FILE = "attnres_queries.safetensors"
"""The queries' file in an adapter directory; the :class:`AttnResConfig` is in its metadata (key ``"attnres"``)."""


def save_pretrained(peft_model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Save a ``peft`` model's adapter and, beside it, the queries and the :class:`AttnResConfig`.

    Calls ``peft_model.save_pretrained(save_directory, **kwargs)`` (the adapter
    only, as ``peft`` saves it), then :func:`save_queries`. Load both with
    :func:`from_pretrained`.
    """
    from peft import PeftModel

    where = "attnres_compile.peft.save_pretrained"
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"{where}: {type(peft_model).__name__} is not a peft model; save a full model with "
            "attnres_compile.save_pretrained(model, path) (e.g. the result of peft_model.merge_and_unload())"
        )
    _prepared_queries(peft_model, where)
    peft_model.save_pretrained(save_directory, **kwargs)
    save_queries(peft_model, save_directory)


def save_queries(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write a prepared model's queries to ``directory/attnres_queries.safetensors``, its config in the metadata.

    ``model`` may be a ``peft`` model (its queries are those of the model it
    wraps). ``directory`` must exist.
    """
    from safetensors.torch import save_file

    attnres = _prepared_queries(model, "attnres_compile.peft.save_queries")
    tensors = {f"{QUERY_PREFIX}{k}": q.detach().cpu().contiguous() for k, q in enumerate(attnres.queries)}
    metadata = {CONFIG_KEY: json.dumps(attnres.config.to_dict(), sort_keys=True)}
    save_file(tensors, os.path.join(os.fspath(directory), QUERIES_FILE), metadata=metadata)
    log.info("attnres: saved %s to %s", attnres, directory)


def load_queries(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the queries saved by :func:`save_queries` into a model prepared with the same config.

    Raises
    ------
    ValueError
        If ``directory`` holds no queries file, it was saved with another
        :class:`AttnResConfig`, or its queries do not fit the model (both shapes named).
    """
    path = os.fspath(directory)
    where = "attnres_compile.peft.load_queries"
    attnres = _prepared_queries(model, where)
    saved, config = _read_queries_file(path, where)
    if config != attnres.config:
        raise ValueError(
            f"{where}: the queries in {path!r} were trained with {config}, the model is prepared with "
            f"{attnres.config}; prepare the base model with the saved config"
        )
    _copy_queries(attnres, saved, path)


def from_pretrained(
    base_model: nn.Module,
    adapter_path: str | os.PathLike,
    example_inputs: tuple,
    *,
    example_kwargs: Optional[dict[str, Any]] = None,
    is_trainable: bool = False,
    **peft_kwargs: Any,
) -> nn.Module:
    """Load an adapter saved by :func:`save_pretrained` onto ``base_model``, queries included.

    Prepares ``base_model`` with the saved :class:`AttnResConfig` (tracing it
    once on ``example_inputs`` / ``example_kwargs``, as
    :func:`~attnres_compile.prepare` does), wraps it with
    ``peft.PeftModel.from_pretrained(base_model, adapter_path, is_trainable=..., **peft_kwargs)``
    and copies the saved queries in. With ``is_trainable=True`` the queries
    train beside the adapter.

    Raises
    ------
    ValueError
        If ``adapter_path`` holds no queries file (an adapter saved by
        ``peft`` alone) or its queries do not fit the model (both shapes named).
    """
    from peft import PeftModel

    path = os.fspath(adapter_path)
    saved, config = _read_queries_file(path, "attnres_compile.peft.from_pretrained")
    prepare(base_model, example_inputs, config, example_kwargs=example_kwargs)
    attnres = _prepared_queries(base_model, f"attnres_compile.peft.from_pretrained({path!r})")
    model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable, **peft_kwargs)
    _copy_queries(attnres, saved, path)
    for query in attnres.queries:
        query.requires_grad_(is_trainable)
    log.info("attnres: loaded the adapter and %s from %s", attnres, path)
    return model


def _read_queries_file(path: str, where: str) -> tuple[dict, AttnResConfig]:
    """The saved queries and the config recorded with them."""
    from safetensors import safe_open

    file = os.path.join(path, QUERIES_FILE)
    if not os.path.isfile(file):
        raise ValueError(
            f"{where}: no {QUERIES_FILE} in {path!r}: it was saved by peft alone, which keeps no attnres queries. "
            "Save with attnres_compile.peft.save_pretrained(peft_model, path) (Trainer checkpoints: pass "
            "callbacks=[attnres_compile.peft.QueriesInCheckpoints()]); to start from zero queries, prepare the base "
            "model and use peft.PeftModel.from_pretrained"
        )
    with safe_open(file, framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        recorded = (f.metadata() or {}).get(CONFIG_KEY)
    if recorded is None:
        raise ValueError(f"{where}: {file} records no {CONFIG_KEY!r} config in its metadata")
    return saved, AttnResConfig.from_dict(json.loads(recorded))


class QueriesInCheckpoints(TrainerCallback):
    """A ``Trainer`` callback that writes the queries into every checkpoint of a ``peft`` model.

    ``Trainer`` saves a ``peft`` model's checkpoints with ``peft``, which keeps
    the adapter only. This adds ``attnres_queries.safetensors`` to each
    ``checkpoint-<step>`` folder; to resume, :func:`load_queries` from that
    folder first (``Trainer`` itself reloads only the adapter there)::

        trainer = Trainer(model=peft_model, args=args, callbacks=[QueriesInCheckpoints()], ...)
        attnres_compile.peft.load_queries(peft_model, "out/checkpoint-500")
        trainer.train(resume_from_checkpoint="out/checkpoint-500")

    A model ``Trainer`` saves whole (no ``peft``) keeps its queries without it.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:  # Trainer writes its checkpoints from the main process only
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):  # e.g. a hyperparameter search, which saves under a folder per trial
            log.warning("attnres: no checkpoint folder %s to save the queries into", folder)
            return
        save_queries(model, folder)

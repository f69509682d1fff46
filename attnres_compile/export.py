"""The export path: rewrite a ``torch.export`` program into Block AttnRes (design §5).

    ep = torch.export.export(model, args, kwargs, strict=False)
    gm = attnres_compile.rewrite(ep)                   # zero-init queries: same outputs
    torch.export.export(gm, args, kwargs)              # runs, re-exports, saves as .pt2

:func:`rewrite` runs the same pipeline as the backend (``core.run_pipeline``).
The learned queries become ``nn.Parameter``s of the result, ``attnres_queries_<k>``
as :func:`attnres_compile.prepare` names them, read by ``get_attr`` nodes, so
they train, show in ``state_dict`` and are parameters of a re-exported program.
:func:`rewrite_to_file` is the whole ``attnres-compile rewrite`` command:
rewrite, check the zero-init identity, export and save.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import Tensor

from .config import AttnResConfig
from .core import PLAN_KEY, UnpreparedQueries, run_pipeline
from .passes.plan import Plan
from .queries import read_query_marker
from .verify import VerifyReport, verify_rewrite

log = logging.getLogger("attnres_compile")

__all__ = ["PLAN_KEY", "RewrittenFile", "rewrite", "rewrite_to_file"]


def graph_module_of(program: Union[torch.export.ExportedProgram, fx.GraphModule]) -> fx.GraphModule:
    if isinstance(program, torch.export.ExportedProgram):
        return program.module()
    if isinstance(program, fx.GraphModule):
        return program
    raise TypeError(
        f"attnres rewrite: expected a torch.export.ExportedProgram or an fx.GraphModule, got {type(program).__name__}"
    )


def _refuse_a_second_config(gm: fx.GraphModule, config: Optional[AttnResConfig]) -> None:
    """A program of a prepared model carries the config its queries were trained with; another one is an error."""
    binding = read_query_marker(gm)
    if config is not None and binding is not None and binding.config != config:
        raise ValueError(
            f"attnres rewrite: the program's model was prepared with {binding.config}, not {config}; "
            "rewrite it without a config (or prepare the model with this one)"
        )


def rewrite(
    program: Union[torch.export.ExportedProgram, fx.GraphModule],
    config: Optional[AttnResConfig] = None,
    *,
    queries: Optional[Sequence[Tensor]] = None,
) -> fx.GraphModule:
    """Rewrite the residual stream(s) of an exported program into Block AttnRes.

    Parameters
    ----------
    program:
        A ``torch.export.ExportedProgram`` (non-strict export recommended), or an
        ``fx.GraphModule`` whose parameters are ``get_attr`` nodes (such as
        ``program.module()``; it is rewritten in place).
    config:
        Partition, scale and eps. Default: the config of a model that
        :func:`attnres_compile.prepare` prepared before export, else ``AttnResConfig()``.
    queries:
        Initial query values, one ``[L_k + 1, d_k]`` tensor per stream (e.g.
        trained ones). Default: the prepared model's queries, else zeros, which
        reproduce the original model exactly under ``scale="count"``.

    Returns
    -------
    fx.GraphModule
        The rewritten module, with parameters ``attnres_queries_<k>`` (fp32) and
        the plan in ``gm.meta["attnres_plan"]``. With no residual stream found
        (post-norm models, no layers) the module comes back unchanged, with the
        reason logged and in the plan's skipped sites.
    """
    gm = graph_module_of(program)
    _refuse_a_second_config(gm, config)
    result = run_pipeline(
        gm, (), config, unprepared=UnpreparedQueries.NEW_PARAMETERS, initial_queries=queries, where="this program"
    )
    if not result.rewritten:
        gm.meta[PLAN_KEY] = result.plan  # what was looked at and why it was skipped
        log.info("attnres: no residual stream in this program, returning it unchanged\n%s", result.plan.summary())
        return gm
    log.info("attnres: rewrote exported program\n%s", result.plan.summary())
    return gm


@dataclass
class RewrittenFile:
    """What :func:`rewrite_to_file` did: the plan, the identity check, and whether it saved."""

    plan: Plan
    verification: Optional[VerifyReport]
    saved: bool


def rewrite_to_file(
    program: torch.export.ExportedProgram,
    path: Union[str, os.PathLike],
    config: Optional[AttnResConfig] = None,
    *,
    verify: bool = True,
) -> RewrittenFile:
    """Rewrite ``program``, check the zero-init identity on its example inputs, export and save it as ``.pt2``.

    Nothing is saved when no stream is found or the check fails (``saved`` False).
    """
    args, kwargs = program.example_inputs or ((), {})
    rewritten = rewrite(program.module(), config)
    plan = rewritten.meta[PLAN_KEY]
    if not plan.streams:
        return RewrittenFile(plan, None, saved=False)
    report = verify_rewrite(program.module(), rewritten, tuple(args), example_kwargs=dict(kwargs)) if verify else None
    if report is not None and not report.ok:
        return RewrittenFile(plan, report, saved=False)
    torch.export.save(torch.export.export(rewritten, tuple(args), dict(kwargs), strict=False), os.fspath(path))
    return RewrittenFile(plan, report, saved=True)

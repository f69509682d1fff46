"""attnres-compile: turn pre-norm transformers into Block Attention Residuals transformers.

    model = attnres_compile.prepare(model, example_inputs)      # zero-init queries
    model = torch.compile(model, backend="attnres")              # rewrite + Inductor
    report = attnres_compile.verify(model, example_inputs)        # numerics vs eager
    gm = attnres_compile.rewrite(torch.export.export(model, args))  # the export path
    graphs = attnres_compile.inspect_model(model, example_inputs)   # dry run: plan, before/after
"""

import logging

from .config import AttnResConfig  # first: the passes import it

from .backend import AttnResBackend, attnres_backend
from .export import rewrite
from .hf import from_pretrained, save_pretrained
from .inspect import inspect_model, inspect_program
from .prepare import prepare
from .queries import AttnResQueries
from .verify import VerifyReport, verify, verify_rewrite

logging.getLogger("attnres_compile").addHandler(logging.NullHandler())

__all__ = [
    "AttnResBackend",
    "AttnResConfig",
    "AttnResQueries",
    "VerifyReport",
    "attnres_backend",
    "from_pretrained",
    "inspect_model",
    "inspect_program",
    "prepare",
    "rewrite",
    "save_pretrained",
    "verify",
    "verify_rewrite",
]

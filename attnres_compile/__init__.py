"""attnres-compile: turn pre-norm transformers into Block Attention Residuals transformers.

    model = attnres_compile.prepare(model, example_inputs)      # zero-init queries
    model = torch.compile(model, backend="attnres")              # rewrite + Inductor
    report = attnres_compile.verify(model, example_inputs)        # numerics vs eager
    gm = attnres_compile.rewrite(torch.export.export(model, args))  # the export path
    graphs = attnres_compile.inspect_model(model, example_inputs)   # dry run: plan, before/after
"""

import importlib.util
import logging
import pathlib
import sys


def _mount_checkout_subpackages() -> None:
    """Make ``attnres_compile.passes`` and ``attnres_compile.kernels`` importable from a checkout.

    In the repository they are the top-level folders ``passes/`` and
    ``kernels/``, without an ``__init__.py`` on purpose: a Python started in
    the checkout's root has the root on ``sys.path``, and a *package* named
    ``kernels`` there would shadow Hugging Face's ``kernels``, which
    ``transformers`` imports. A built wheel installs them inside this package
    (setuptools' ``package-dir``); an editable install's finder cannot map a
    folder without ``__init__.py``, so this does it for a checkout.
    """
    here = pathlib.Path(__file__).resolve().parent
    for name in ("passes", "kernels"):
        full_name = f"{__name__}.{name}"
        folder = here.parent / name
        if full_name in sys.modules or (here / name).is_dir() or not folder.is_dir():
            continue
        spec = importlib.util.spec_from_loader(full_name, loader=None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[full_name] = module
        globals()[name] = module


_mount_checkout_subpackages()

from .kernels import ops as _ops  # noqa: E402  (registers torch.ops.attnres.*)
from .backend import AttnResBackend, attnres_backend  # noqa: E402
from .config import AttnResConfig  # noqa: E402
from .dry_run import Inspection, inspect_model, inspect_program  # noqa: E402
from .export import rewrite  # noqa: E402
from .hf import from_pretrained, save_pretrained  # noqa: E402
from .prepare import prepare  # noqa: E402
from .queries import AttnResQueries  # noqa: E402
from .verify import VerifyReport, verify, verify_rewrite  # noqa: E402

logging.getLogger("attnres_compile").addHandler(logging.NullHandler())

__all__ = [
    "AttnResBackend",
    "AttnResConfig",
    "AttnResQueries",
    "Inspection",
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

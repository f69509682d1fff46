"""``attnres-compile``: inspect, diff, rewrite and plot from the command line.

    attnres-compile inspect examples/tiny_gpt.py:TinyGPT --tokens 2x16
    attnres-compile diff model.pt2 --html diff.html
    attnres-compile rewrite model.pt2 model_attnres.pt2
    attnres-compile plot examples/tiny_gpt.py:TinyGPT alpha.png --tokens 2x16

A TARGET is a ``.pt2`` file (``torch.export.save``) or a factory, given as
``package.module:name`` or ``path/to/file.py:name``: a callable that returns a
model, ``(model, args)`` or ``(model, args, kwargs)``. When it returns only a
model, ``--tokens BxT`` (token ids below the size of the model's first
embedding) or ``--floats BxTxD`` make the example input. A ``.pt2`` file brings
its own example inputs.

Exit codes: 0 done, 1 the rewrite failed verification, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .config import AttnResConfig

log = logging.getLogger("attnres_compile")

PROG = "attnres-compile"


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit code 2."""


@dataclass
class Target:
    """What a TARGET argument names: a model with example inputs, or an exported program."""

    name: str
    model: Optional[nn.Module] = None
    program: Optional[torch.export.ExportedProgram] = None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- loading targets


def _parse_shape(text: str, option: str) -> list[int]:
    try:
        shape = [int(part) for part in text.lower().split("x")]
    except ValueError:
        shape = []
    if not shape or any(size <= 0 for size in shape):
        raise UsageError(f"{option} expects sizes like 2x16, got {text!r}")
    return shape


def _vocab_size(model: nn.Module) -> int:
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise UsageError(f"--tokens needs a model with an nn.Embedding; {type(model).__name__} has none (use --floats)")
    return embedding.num_embeddings


def _example_inputs(model: nn.Module, options: argparse.Namespace) -> tuple:
    gen = torch.Generator().manual_seed(options.seed)
    if options.tokens:
        shape = _parse_shape(options.tokens, "--tokens")
        return (torch.randint(0, _vocab_size(model), shape, generator=gen),)
    if options.floats:
        return (torch.randn(_parse_shape(options.floats, "--floats"), generator=gen),)
    raise UsageError(
        "the factory returned only a model: give its example input with --tokens BxT or --floats BxTxD, "
        "or return (model, args) from the factory"
    )


def _import_factory(spec: str):
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"target {spec!r} is neither a .pt2 file nor module:factory")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            if not os.path.isfile(module_name):
                raise UsageError(f"no such file: {module_name}")
            # as `python file.py` would: the file's folder is where its own imports are found
            sys.path.insert(0, os.path.dirname(os.path.abspath(module_name)))
            file_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[file_spec.name] = module  # dataclasses and pickling look the module up by name
            file_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"cannot import {module_name}: {type(error).__name__}: {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{module_name} has no callable {attr!r}")
    return factory


def _load_factory(spec: str, options: argparse.Namespace) -> Target:
    factory = _import_factory(spec)
    try:
        made = factory()
    except Exception as error:
        raise UsageError(f"{spec}() failed: {type(error).__name__}: {error}") from error
    parts = made if isinstance(made, tuple) else (made,)
    model = parts[0]
    if not isinstance(model, nn.Module) or len(parts) > 3:
        raise UsageError(f"{spec}() must return a model, (model, args) or (model, args, kwargs), got {type(made).__name__}")
    args = tuple(parts[1]) if len(parts) > 1 else _example_inputs(model, options)
    kwargs = dict(parts[2]) if len(parts) > 2 else {}
    return Target(name=spec, model=model.eval(), args=args, kwargs=kwargs)


def _load_program(path: str) -> Target:
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    try:
        with _quiet("torch.export"):  # it logs a traceback before raising; one line is enough
            program = torch.export.load(path)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(f"cannot load {path} as a torch.export program: {type(error).__name__}: {first_line}") from error
    args, kwargs = program.example_inputs or ((), {})
    if not args and not kwargs:
        raise UsageError(f"{path} holds no example inputs (save it from torch.export.export(model, args))")
    return Target(name=path, program=program, args=tuple(args), kwargs=dict(kwargs))


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_target(spec: str, options: argparse.Namespace) -> Target:
    """A ``.pt2`` file or a ``module:factory``, with example inputs."""
    if spec.endswith(".pt2"):
        return _load_program(spec)
    return _load_factory(spec, options)


def _config(options: argparse.Namespace) -> AttnResConfig:
    given = {"num_blocks": options.num_blocks, "block_size": options.block_size, "eps": options.eps}
    try:
        return AttnResConfig(scale=options.scale, **{k: v for k, v in given.items() if v is not None})
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from error


# ---------------------------------------------------------------- commands


def _inspect(target: Target, config: AttnResConfig):
    from .dry_run import inspect_model, inspect_program

    if target.program is not None:
        return [inspect_program(target.program, config)]
    return inspect_model(target.model, target.args, config, example_kwargs=target.kwargs)


def cmd_inspect(options: argparse.Namespace) -> int:
    from .report import format_plan, plan_report

    target = load_target(options.target, options)
    graphs = _inspect(target, _config(options))
    if options.json:
        import json

        reports = [dict(origin=g.origin, refused=g.refused, **plan_report(g.plan)) for g in graphs]
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
        return 0
    for graph in graphs:
        print(f"{target.name} ({graph.origin})")
        print(format_plan(graph.plan))
        if graph.refused:
            print(f"not rewritten: {graph.refused}")
    return 0


def cmd_diff(options: argparse.Namespace) -> int:
    from .report import diff_text, write_diff_html

    target = load_target(options.target, options)
    rewritten = [g for g in _inspect(target, _config(options)) if g.after is not None]
    if not rewritten:
        raise UsageError(f"nothing to diff: no residual stream of {target.name} was rewritten (run inspect for the reasons)")
    if options.html:
        graph = rewritten[0]
        write_diff_html(options.html, graph.before, graph.after, graph.plan, title=f"attnres rewrite of {target.name}")
        print(f"wrote {options.html}")
    else:
        for graph in rewritten:
            print(diff_text(graph.before, graph.after, graph.plan))
    return 0


def cmd_rewrite(options: argparse.Namespace) -> int:
    from .export import rewrite_to_file

    if not options.target.endswith(".pt2") or not options.output.endswith(".pt2"):
        raise UsageError("rewrite takes a .pt2 file in and a .pt2 path out")
    target = _load_program(options.target)
    done = rewrite_to_file(target.program, options.output, _config(options), verify=not options.no_verify)
    if not done.plan.streams:
        raise UsageError(f"no residual stream in {target.name}: nothing to rewrite\n{done.plan.summary()}")
    print(done.plan.summary())
    if done.verification is not None:
        print(done.verification)
    if not done.saved:
        print(f"{PROG}: the rewrite failed verification; {options.output} not written", file=sys.stderr)
        return 1
    print(f"wrote {options.output}")
    return 0


def cmd_plot(options: argparse.Namespace) -> int:
    from .depth_weights import depth_weights, depth_weights_of_program
    from .report import plot_depth_weights

    target = load_target(options.target, options)
    if target.program is not None:
        weights = depth_weights_of_program(target.program, _config(options))
    else:
        weights = depth_weights(target.model, target.args, example_kwargs=target.kwargs)
    plot_depth_weights(weights, options.output, title=f"Block AttnRes depth weights: {target.name}")
    print(f"wrote {options.output}")
    return 0


# ---------------------------------------------------------------- argument parsing


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a .pt2 file, or module:factory / file.py:factory returning a model")
    group = parser.add_argument_group("example input (for a factory that returns only a model)")
    group.add_argument("--tokens", metavar="BxT", help="random token ids of this shape, e.g. 2x16")
    group.add_argument("--floats", metavar="BxTxD", help="a random float tensor of this shape")
    group.add_argument("--seed", type=int, default=0, help="seed of the random example input (default 0)")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Block AttnRes config")
    group.add_argument("--num-blocks", type=int, help="number of blocks (default 8)")
    group.add_argument("--block-size", type=int, help="layers per block (instead of --num-blocks)")
    group.add_argument("--scale", choices=("count", "mean"), default="count", help="read scale (default count)")
    group.add_argument("--eps", type=float, help="key-norm eps (default: the model's own norm eps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Find, rewrite and inspect Block AttnRes residual streams.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the pass at INFO")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="list streams, layers, blocks and skipped sites (a dry run)")
    _add_target_options(inspect)
    _add_config_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print the plan as JSON")
    inspect.set_defaults(run=cmd_inspect)

    diff = commands.add_parser("diff", help="before/after graphs of the rewrite, as text or one HTML file")
    _add_target_options(diff)
    _add_config_options(diff)
    diff.add_argument("--html", metavar="PATH", help="write a self-contained HTML diff to PATH")
    diff.set_defaults(run=cmd_diff)

    rewrite = commands.add_parser("rewrite", help="rewrite a .pt2 program, verify it, save the result as .pt2")
    rewrite.add_argument("target", help="the .pt2 file to rewrite")
    rewrite.add_argument("output", help="where to save the rewritten .pt2")
    _add_config_options(rewrite)
    rewrite.add_argument("--no-verify", action="store_true", help="skip the zero-init identity check")
    rewrite.set_defaults(run=cmd_rewrite, tokens=None, floats=None, seed=0)

    plot = commands.add_parser("plot", help="heatmap of the mean read weights (PNG)")
    _add_target_options(plot)
    plot.add_argument("output", help="the PNG to write")
    _add_config_options(plot)
    plot.set_defaults(run=cmd_plot)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if options.verbose else logging.WARNING, format="%(message)s")
    try:
        return options.run(options)
    except UsageError as error:
        print(f"{PROG} {options.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

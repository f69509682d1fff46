"""One GPU check of attnres-compile: kernels, a compiled Llama, the read roofline, overhead, compile time.

    scripts/gpu_check.sh                               # CUDA: every stage, at most 8 minutes on one H100
    scripts/gpu_check.sh --smoke                       # CPU: every stage's plumbing at tiny shapes (CI)
    scripts/gpu_check.sh --stages e2e --limit e2e=300  # a rerun of some stages, with more time
    scripts/gpu_check.sh --out DIR                     # results folder (default $OUT/gpu_check, else runs/gpu_check)

Stages, in this order, each in processes of its own under its own time limit,
so that a crash or a hang costs that stage only; the whole run also stops at
``--budget`` seconds (480 on CUDA: a stage starts with what is left of it):

- ``setup``: makes the checkout importable without changing the machine's
  Python (already installed, else ``PYTHONPATH`` = the checkout plus a
  metadata-only stand-in of the install that registers ``backend="attnres"``
  for every process), installs the anchor wheels found in ``.gpu_wheels/``
  into a scratch folder for the read stage, records the versions; on CUDA it
  fails where no GPU is visible.
- ``kernels``: ``pytest tests/kernels`` natively on CUDA (opcheck on the Triton
  path included); the compiled-Llama tests are left to the next stage, which
  runs the same model and checks with a table. Smoke: a few Triton kernel
  tests under ``TRITON_INTERPRET=1``.
- ``llama``: a compiled tiny HF Llama (4 residual steps, 2 blocks, random
  queries): the Triton kernels in Inductor's output code and
  ``attnres_compile.verify``, fp32 and bf16, Triton and aten merge. Smoke: one
  bf16 row on the CPU reference path (no kernels to look for).
- ``read``: ``benchmarks/bench_read.py`` at the headline shape (T 16384, d 2048,
  N 9, S 6, bf16), with the anchors that are importable. Smoke: ``--smoke``.
- ``e2e``: ``benchmarks/bench_e2e.py --overhead`` at 24 x 1024. Smoke: 1 x 32.
- ``compile``: ``benchmarks/bench_compile.py`` at 24 layers (smoke: 1 layer, one step, cold only, on the
  environment's Inductor cache), skipped
  while that file does not exist.

Results folder, at most 7 files and no sub-folder (what a device machine
returns): ``summary.md``, ``gpu_check.log`` (the runner's lines and every
stage's output), ``kernels.md``, ``llama.md``, ``read.md``, ``e2e.md``,
``compile.md``. The last lines printed are the summary, one line per stage.
Exit status 0 only if every stage that ran passed; a skipped stage does not count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
ANCHOR_WHEELS = REPO / ".gpu_wheels"

STAGES = ("setup", "kernels", "llama", "read", "e2e", "compile")
SUMMARY_FILE = "summary.md"
LOG_FILE = "gpu_check.log"
TABLE_FILES = {name: f"{name}.md" for name in STAGES[1:]}  # setup writes no table
MAX_RESULT_FILES = 7  # a device machine returns at most 8 files; one to spare

# Seconds. Each limit only stops a hang; the budget is the promise (8 minutes on
# CUDA), so a slow early stage leaves less to the later ones.
LIMITS_CUDA = {"setup": 45, "kernels": 90, "llama": 120, "read": 90, "e2e": 180, "compile": 150}
LIMITS_SMOKE = {"setup": 90, "kernels": 150, "llama": 240, "read": 120, "e2e": 240, "compile": 240}
BUDGET_CUDA, BUDGET_SMOKE = 480, 600
MIN_STAGE_SECONDS = 15  # a stage is not started with less of the budget left
KILL_GRACE_SECONDS = 5

OK, FAILED, SKIPPED, TIMED_OUT = "ok", "failed", "skipped", "timed out"

# llama: max |got - want| / max |want| over outputs and gradient groups (verify's measure).
# fp32 on CUDA: matmuls and fused reductions run in another order than eager (test_triton_cuda.py).
# bf16: one bf16 rounding is up to 2^-8 = 3.9e-3 of the largest entry; eager rounds every op's
# output while Inductor rounds once per fused kernel, so the two differ by a few roundings along
# each output and gradient (a bf16 CPU run measures 1.4e-2 at worst). 5e-2 leaves room for the
# GPU's other reduction orders; a kernel slip (wrong source, scale or partial) is O(1).
LLAMA_RTOL = {("cuda", "float32"): 1e-4, ("cpu", "float32"): 1e-5, ("cuda", "bfloat16"): 5e-2,
              ("cpu", "bfloat16"): 5e-2}
PHASE1_FORWARD_KERNELS = ("_block_read_fwd_kernel", "_block_read_fwd_rows_kernel")  # launcher picks by d, S
MERGE_KERNELS = ("_merge_fwd_kernel", "_merge_bwd_kernel")

READ_SHAPE = "16384x2048x9"
READ_LAYERS = 6
OUR_READ_ROWS = ("reference, eager", "reference, torch.compile", "ours, Triton merge, eager",
                 "ours, Triton merge, torch.compile", "ours, aten merge, torch.compile")
COMPILED_MERGE_ROWS = {"Triton": "ours, Triton merge, torch.compile", "aten": "ours, aten merge, torch.compile"}
READ_ERR_TOL = 2e-2  # bf16 outputs vs the fp32 reference: two roundings (tests/benchmarks/test_bench_read.py)

E2E_SHAPE_CUDA, E2E_SHAPE_SMOKE = "24x1024", "1x32"


# --------------------------------------------------------------------------
# The runner: stages as processes with time limits, one log, one summary
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRun:
    """What a stage's command did: exit status (None: stopped at its limit), seconds, output."""

    returncode: Optional[int]
    seconds: float
    output: str


@dataclass(frozen=True)
class Verdict:
    ok: bool
    headline: str


def judge_by_exit_code(run: StageRun) -> Verdict:
    return Verdict(run.returncode == 0, f"exit code {run.returncode}")


@dataclass(frozen=True)
class Stage:
    """A command run from the repository root in a process group of its own, then judged.

    ``judge`` reads what the command left (its output, its table) and says whether
    the stage passed and what its headline figure is; it is asked also after a
    failure or a timeout, so that a partial table still gives a headline.
    """

    name: str
    command: Sequence[str] = ()
    limit_s: float = 60.0
    env: Mapping[str, str] = field(default_factory=dict)  # on top of the run's base environment
    judge: Callable[[StageRun], Verdict] = judge_by_exit_code
    skip_reason: str = ""


@dataclass(frozen=True)
class Outcome:
    stage: str
    status: str  # OK, FAILED, SKIPPED or TIMED_OUT
    seconds: float
    headline: str


class RunLog:
    """The run's one log file: the runner's own timestamped lines and every stage's output."""

    def __init__(self, path: Path, echo: bool = True):
        self.path = path
        self.file = open(path, "a", buffering=1, encoding="utf-8")
        self.start = time.monotonic()
        self.echo = echo

    def note(self, message: str, echo: bool = False) -> None:
        line = f"[{time.monotonic() - self.start:7.1f} s] {message}"
        self.file.write(line + "\n")
        self.file.flush()
        if echo and self.echo:
            print(line, flush=True)

    def size(self) -> int:
        self.file.flush()
        return self.path.stat().st_size

    def read_from(self, offset: int) -> str:
        self.file.flush()
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")

    def close(self) -> None:
        self.file.close()


def _kill_process_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_SECONDS) -> None:
    """End the stage's whole process group (pytest, Inductor's compile workers): SIGTERM, then SIGKILL.

    Also after a normal exit, so that nothing a stage started outlives it on the GPU.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
    proc.wait()


def run_stage(stage: Stage, log: RunLog, deadline: float, base_env: Mapping[str, str], cwd: Path = REPO) -> Outcome:
    """Run one stage under ``min(stage.limit_s, time left before deadline)``; never raises for its failure."""
    if stage.skip_reason:
        log.note(f"stage {stage.name}: skipped: {stage.skip_reason}", echo=True)
        return Outcome(stage.name, SKIPPED, 0.0, stage.skip_reason)
    left = deadline - time.monotonic()
    if left < MIN_STAGE_SECONDS:
        reason = f"out of time: {max(left, 0):.0f} s of the budget left"
        log.note(f"stage {stage.name}: skipped: {reason}", echo=True)
        return Outcome(stage.name, SKIPPED, 0.0, reason)
    limit = min(stage.limit_s, left)
    extra = " ".join(f"{k}={v}" for k, v in stage.env.items())
    log.note(f"stage {stage.name} (limit {limit:.0f} s): {extra + ' ' if extra else ''}{shlex.join(stage.command)}",
             echo=True)
    offset = log.size()
    start = time.monotonic()
    proc = subprocess.Popen(
        list(stage.command), cwd=cwd, env={**base_env, **stage.env}, stdin=subprocess.DEVNULL,
        stdout=log.file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        returncode: Optional[int] = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_process_group(proc)
        returncode = None
    except BaseException:  # the run itself is being stopped: take the stage's processes with it
        _kill_process_group(proc)
        raise
    seconds = time.monotonic() - start
    _kill_process_group(proc)  # a normal exit can leave workers behind
    run = StageRun(returncode, seconds, log.read_from(offset))
    try:
        verdict = stage.judge(run)
    except Exception as error:  # a judge that trips over odd output fails its stage, not the run
        verdict = Verdict(False, f"could not read the stage's results: {type(error).__name__}: {error}")
    if returncode is None:
        status, headline = TIMED_OUT, f"stopped at {limit:.0f} s; {verdict.headline}"
    elif returncode == 0 and verdict.ok:
        status, headline = OK, verdict.headline
    else:
        status = FAILED
        headline = verdict.headline if returncode == 0 or "exit code" in verdict.headline \
            else f"exit code {returncode}; {verdict.headline}"
    log.note(f"stage {stage.name}: {status} in {run.seconds:.1f} s: {headline}", echo=True)
    return Outcome(stage.name, status, run.seconds, headline)


def run_stages(stages: Sequence[Stage], log: RunLog, deadline: float, base_env: Mapping[str, str],
               cwd: Path = REPO) -> list[Outcome]:
    """Every stage in order; a SIGTERM/SIGINT stops the one running and skips the rest."""
    outcomes: list[Outcome] = []
    for i, stage in enumerate(stages):
        started = time.monotonic()
        try:
            outcomes.append(run_stage(stage, log, deadline, base_env, cwd))
        except KeyboardInterrupt:
            log.note(f"stage {stage.name}: interrupted; the remaining stages are skipped", echo=True)
            outcomes.append(Outcome(stage.name, TIMED_OUT, time.monotonic() - started, "interrupted"))
            outcomes += [Outcome(s.name, SKIPPED, 0.0, "the run was interrupted") for s in stages[i + 1:]]
            break
    return outcomes


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """0 only if every stage that ran passed."""
    return 0 if all(o.status in (OK, SKIPPED) for o in outcomes) else 1


def summary_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """One line per stage: name, status, seconds, headline."""
    return [f"{o.stage:<8} {o.status:<9} {o.seconds:6.1f} s  {o.headline}" for o in outcomes]


def summary_markdown(outcomes: Sequence[Outcome], context_lines: Sequence[str]) -> str:
    lines = ["# GPU check", "", *context_lines, "",
             "| stage | status | seconds | headline |", "|---|---|---:|---|"]
    lines += [f"| {o.stage} | {o.status} | {o.seconds:.1f} | {o.headline.replace('|', '/')} |" for o in outcomes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Markdown tables the stages write
# --------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_rows(path: Path) -> list[dict[str, str]]:
    """The data rows of the first markdown table in ``path``, keyed by header cell ([] if none)."""
    if not path.is_file():
        return []
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and re.fullmatch(r"\|[\s:|-]+\|?", lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            for line in lines[i + 2:]:
                if not line.startswith("|"):
                    break
                rows.append(dict(zip(header, _cells(line))))
            return rows
    return []


def _float(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", "").rstrip("%"))
    except (AttributeError, ValueError):
        return None


# --------------------------------------------------------------------------
# Setup: the checkout importable, the anchors installed, the machine recorded
# --------------------------------------------------------------------------

PROBE = r"""
import json, platform
info = {"python": platform.python_version()}
import torch
info["torch"] = torch.__version__
info["cuda"] = torch.cuda.is_available()
info["device"] = torch.cuda.get_device_name() if info["cuda"] else "CPU"
for name in ("triton", "transformers"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:
        info[name] = f"missing ({type(error).__name__})"
try:
    import attnres_compile
    info["package"] = attnres_compile.__file__
except Exception as error:
    info["package_error"] = f"{type(error).__name__}: {error}"
try:
    from torch._dynamo.backends.registry import lookup_backend
    lookup_backend("attnres")
    info["backend"] = True
except Exception as error:
    info["backend"] = False
    info["backend_error"] = f"{type(error).__name__}: {error}"
print("PROBE " + json.dumps(info))
"""


@dataclass
class Context:
    """What the stages share: mode, folders, interpreter and the environment setup made."""

    smoke: bool
    results: Path
    scratch: Path  # temporary: junit XML, the anchors' install, the entry-point stand-in
    python: str
    env: dict[str, str]
    limits: dict[str, float]
    anchors_path: Optional[Path] = None
    machine: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"


def base_environment(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # no network there
    # No graph-level caches: the FX graph and AOTAutograd caches key on the traced graph, which
    # names the attnres::* ops but not their Python bodies, and once served code compiled against
    # another kernels/ops.py (a warm GPU machine keeps /tmp between runs, too). The kernel-level
    # caches stay: they key on the generated source, and spare the C++/Triton compiler.
    env.update(TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    if smoke:
        # CPU paths even on a machine with a GPU; one Inductor compile thread, since starting a
        # pool of compile workers costs more than it saves at these sizes (2 cores: 2x slower).
        env.update(CUDA_VISIBLE_DEVICES="", TORCHINDUCTOR_COMPILE_THREADS="1")
    return env


def probe_environment(ctx: Context, timeout: float) -> dict:
    """Versions, device, where ``attnres_compile`` imports from and whether ``backend="attnres"`` resolves.

    From a scratch folder, so that the working directory puts nothing on ``sys.path``.
    """
    proc = subprocess.run([ctx.python, "-c", PROBE], cwd=ctx.scratch, env=ctx.env, capture_output=True,
                          text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    return {"probe_error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def _imports_this_checkout(info: dict) -> bool:
    package = info.get("package")
    return bool(package) and Path(package).resolve().is_relative_to(REPO) and info.get("backend") is True


def write_entry_point_stand_in(folder: Path) -> Path:
    """A metadata-only distribution that registers the ``torch_dynamo_backends`` entry point.

    ``torch.compile(..., backend="attnres")`` finds backends through
    ``importlib.metadata`` entry points, which an install provides; on
    ``sys.path`` (with the checkout) this folder provides the same to every
    process of the run without installing anything. The entry point is read
    from pyproject.toml, so it cannot drift from the real one.
    """
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dist_info = folder / f"attnres_compile-{project['version']}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    (dist_info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items()) + "\n"
        for group, points in groups.items()))
    return folder


def make_importable(ctx: Context, log: RunLog, timeout: float) -> tuple[bool, str]:
    """Use an install of this checkout if there is one, else ``PYTHONPATH`` = checkout + entry-point stand-in.

    Nothing is installed into the machine's Python: this works offline, in CI's
    smoke run and on a bare GPU machine alike.
    """
    info = probe_environment(ctx, timeout)
    log.note(f"probe: {json.dumps(info)}")
    if _imports_this_checkout(info):
        ctx.machine = info
        return True, "installed checkout"
    stand_in = write_entry_point_stand_in(ctx.scratch / "entry_points")
    paths = [str(REPO), str(stand_in)] + ([ctx.env["PYTHONPATH"]] if ctx.env.get("PYTHONPATH") else [])
    ctx.env["PYTHONPATH"] = os.pathsep.join(paths)
    log.note(f"not installed from this checkout: PYTHONPATH={ctx.env['PYTHONPATH']} "
             f"(the checkout, and {stand_in} for the backend's entry point)")
    info = probe_environment(ctx, timeout)
    log.note(f"probe: {json.dumps(info)}")
    ctx.machine = info
    if _imports_this_checkout(info):
        return True, "PYTHONPATH (checkout + entry point)"
    reason = info.get("probe_error") or info.get("package_error") or info.get("backend_error") or "not this checkout"
    return False, f"attnres_compile not importable: {reason}"


def install_anchor_wheels(ctx: Context, log: RunLog, timeout: float) -> str:
    """``pip install --no-deps --no-index`` the wheels in ``.gpu_wheels/`` into a scratch folder.

    Only the read stage puts that folder on its ``PYTHONPATH``; absent or broken
    wheels are logged and the read table says "not importable" for them.
    """
    wheels = sorted(ANCHOR_WHEELS.glob("*.whl"))
    if not wheels:
        log.note(f"no anchor wheels in {ANCHOR_WHEELS} (scripts/fetch_anchor_wheels.sh fetches them): "
                 "the read table lists the anchors as not importable")
        return "no anchor wheels"
    target = ctx.scratch / "anchors"
    command = [ctx.python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
               "--disable-pip-version-check", "--quiet", "--target", str(target), *map(str, wheels)]
    log.note(f"installing anchors: {shlex.join(command)}")
    try:
        proc = subprocess.run(command, env=ctx.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.note("anchor install timed out: the read stage runs without them")
        return "anchor install timed out"
    if proc.returncode != 0:
        log.note(f"anchor install failed (exit code {proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return "anchor install failed"
    ctx.anchors_path = target
    return f"{len(wheels)} anchor wheels"


def run_setup(ctx: Context, log: RunLog) -> Outcome:
    """The setup stage, in this process (each step a subprocess under what is left of its limit)."""
    start = time.monotonic()
    limit = ctx.limits["setup"]
    log.note(f"stage setup (limit {limit:.0f} s)", echo=True)

    def left() -> float:
        return max(1.0, limit - (time.monotonic() - start))

    try:
        importable, how = make_importable(ctx, log, left())
        anchors = install_anchor_wheels(ctx, log, left()) if importable else "anchors not installed"
    except subprocess.TimeoutExpired:
        seconds = time.monotonic() - start
        log.note(f"stage setup: {TIMED_OUT} in {seconds:.1f} s", echo=True)
        return Outcome("setup", TIMED_OUT, seconds, "probing the Python environment did not finish")
    m = ctx.machine
    versions = f"{m.get('device', '?')}; torch {m.get('torch', '?')}, triton {m.get('triton', '?')}, " \
               f"transformers {m.get('transformers', '?')}"
    ok = importable
    if not ctx.smoke and not m.get("cuda"):
        ok, how = False, f"no CUDA device visible ({how})"
    seconds = time.monotonic() - start
    outcome = Outcome("setup", OK if ok else FAILED, seconds, f"{how}; {anchors}; {versions}")
    log.note(f"stage setup: {outcome.status} in {seconds:.1f} s: {outcome.headline}", echo=True)
    return outcome


# --------------------------------------------------------------------------
# Stage 1: kernels
# --------------------------------------------------------------------------

# The plumbing only (pytest, its report, the table): the whole interpreter run is the test suite's
# tests/kernels/test_triton_interpreter.py. test_triton_cuda.py is collected and skips on a CPU.
SMOKE_KERNEL_TESTS = ("test_triton_read.py", "test_triton_cuda.py")


def junit_counts(xml_path: Path) -> list[dict]:
    """Per test file: passed, failed, errors, skipped, seconds and the failures' first lines."""
    files: dict[str, dict] = {}
    for case in ElementTree.parse(xml_path).iter("testcase"):
        module = case.get("classname", "").split(".")
        name = next((part for part in reversed(module) if part.startswith("test_")), ".".join(module)) + ".py"
        entry = files.setdefault(name, {"file": name, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                                        "seconds": 0.0, "failures": []})
        entry["seconds"] += float(case.get("time") or 0)
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            entry["failed" if failure is not None else "errors"] += 1
            message = ((failure if failure is not None else error).get("message") or "").strip().splitlines()
            entry["failures"].append((case.get("name", "?"), message[0][:160] if message else ""))
        elif skipped is not None:
            entry["skipped"] += 1
        else:
            entry["passed"] += 1
    return sorted(files.values(), key=lambda e: e["file"])


def write_kernels_table(path: Path, files: list[dict], command: Sequence[str], note: str) -> None:
    lines = ["# Kernel tests", "", f"`{shlex.join(command)}`", "", note, "",
             "| test file | passed | failed | errors | skipped | seconds |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {f['file']} | {f['passed']} | {f['failed']} | {f['errors']} | {f['skipped']} | {f['seconds']:.1f} |"
              for f in files]
    failures = [(f["file"], name, message) for f in files for name, message in f["failures"]]
    if failures:
        lines += ["", "## Failures", "", "| file | test | message |", "|---|---|---|"]
        lines += [f"| {file} | {name} | {message.replace('|', '/')} |" for file, name, message in failures]
    path.write_text("\n".join(lines) + "\n")


def kernels_stage(ctx: Context) -> Stage:
    xml = ctx.scratch / "kernels.xml"
    table = ctx.results / TABLE_FILES["kernels"]
    pytest = [ctx.python, "-m", "pytest", "-q", "--tb=short", "-rfE", f"--junitxml={xml}"]
    if ctx.smoke:
        command = pytest + [f"tests/kernels/{name}" for name in SMOKE_KERNEL_TESTS]
        env = {"TRITON_INTERPRET": "1"}  # before the kernels are decorated: the test process starts with it
        note = ("CPU smoke run: a subset of the Triton kernel tests under TRITON_INTERPRET=1 "
                "(test_triton_cuda.py skips on a CPU).")
    else:
        command = pytest + ["tests/kernels", "-k", "not compiled_llama"]
        env = {}
        note = ("CUDA: every kernel test natively, opcheck on the Triton path included; the compiled-Llama "
                "tests are left to the llama stage (the same model and checks, fp32 and bf16, with a table).")

    def judge(run: StageRun) -> Verdict:
        if not xml.is_file():
            table.write_text(f"# Kernel tests\n\n`{shlex.join(command)}`\n\npytest wrote no report "
                             "(it did not finish); see gpu_check.log.\n")
            return Verdict(False, "no pytest report")
        files = junit_counts(xml)
        write_kernels_table(table, files, command, note)
        total = {k: sum(f[k] for f in files) for k in ("passed", "failed", "errors", "skipped")}
        headline = ", ".join(f"{v} {k}" for k, v in total.items() if v or k == "passed")
        return Verdict(total["passed"] > 0 and total["failed"] == total["errors"] == 0, headline)

    return Stage("kernels", command, ctx.limits["kernels"], env, judge)


# --------------------------------------------------------------------------
# Stage 2: a compiled tiny Llama (this file's --worker llama does the work)
# --------------------------------------------------------------------------

LLAMA_COLUMNS = ("dtype", "merge", "our kernels in Inductor's output code", "output code modules", "verify",
                 "worst rel, zero-init identity", "worst rel, random queries", "tolerance", "seconds", "result",
                 "note")


def llama_cases(device: str) -> list[tuple[str, str]]:
    """(dtype, merge) rows, most telling first, so that a timeout keeps the important ones."""
    if device == "cpu":
        # The CPU runs the reference path (no merge choice). One row: each compiles cold, and bf16 is
        # the row with its own handling (the model's cast, the looser tolerance).
        return [("bfloat16", "reference")]
    return [("float32", "triton"), ("bfloat16", "triton"), ("bfloat16", "aten"), ("float32", "aten")]


def llama_stage(ctx: Context) -> Stage:
    table = ctx.results / TABLE_FILES["llama"]
    command = [ctx.python, str(Path(__file__).resolve()), "--worker", "llama", "--device", ctx.device,
               "--out", str(table)]
    expected = len(llama_cases(ctx.device))

    def judge(run: StageRun) -> Verdict:
        rows = table_rows(table)
        bad = [f"{r['dtype']}/{r['merge']}: {r['note'] or r['verify']}" for r in rows if r.get("result") != OK]
        worst = {}
        for r in rows:
            errors = [_float(r[c]) for c in ("worst rel, zero-init identity", "worst rel, random queries")]
            errors = [e for e in errors if e is not None]
            if errors:
                worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), *errors)
        tolerance = {r["dtype"]: r["tolerance"] for r in rows}
        parts = [f"{dtype} worst {err:.1e} (tol {tolerance[dtype]})" for dtype, err in worst.items()]
        parts.append(f"{len(rows) - len(bad)}/{expected} rows ok")
        if bad:
            parts.append("; ".join(bad))
        return Verdict(len(rows) == expected and not bad, ", ".join(parts))

    return Stage("llama", command, ctx.limits["llama"], {}, judge)


@dataclass
class LlamaRow:
    dtype: str
    merge: str
    kernels: str = ""
    modules: int = 0  # Inductor output code modules of the training step (forward and backward at least)
    verify: str = ""
    worst_zero: Optional[float] = None
    worst_random: Optional[float] = None
    rtol: float = 0.0
    seconds: float = 0.0
    ok: bool = False
    note: str = ""

    def cells(self) -> list[str]:
        def err(value):
            return "" if value is None else f"{value:.1e}"

        return [self.dtype, self.merge, self.kernels, str(self.modules), self.verify, err(self.worst_zero),
                err(self.worst_random), f"{self.rtol:g}", f"{self.seconds:.1f}", OK if self.ok else FAILED,
                self.note.replace("|", "/")]


def llama_layout(device: str) -> tuple[int, int]:
    """(decoder layers, num_blocks). CUDA: the model of tests/kernels/test_triton_cuda.py, 4 residual
    steps in blocks of 2 (phase 1, a merge with a partial, the final read). CPU smoke: half the graph
    to compile, one block of 2 steps, which still has a merge with a partial."""
    return (2, 2) if device == "cuda" else (1, 1)


def tiny_llama(device: str, dtype, layers: int):
    """A tiny LlamaForCausalLM (d 48, 4 heads, 2 KV heads, vocab 128) and input ids ``[2, 9]``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    ids = torch.randint(0, 128, (2, 9)).to(device)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype), ids


def our_kernel_names() -> list[str]:
    """The Triton kernels of kernels/triton_*.py, by function name: how Inductor's output code names them."""
    from attnres_compile.kernels import triton_block_read, triton_merge

    return sorted(name for module in (triton_block_read, triton_merge) for name in vars(module)
                  if name.startswith("_") and name.endswith("_kernel"))


def expected_kernels(device: str, merge: str) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """(kernels that must appear, each a tuple of acceptable names; kernels that must not)."""
    if device == "cpu":
        return [], ()
    want = [PHASE1_FORWARD_KERNELS, ("_block_read_bwd_kernel",)]
    if merge == "triton":
        return want + [(name,) for name in MERGE_KERNELS], ()
    return want, MERGE_KERNELS


def check_llama(device: str, dtype_name: str, merge: str) -> LlamaRow:
    """Compile one training step with backend="attnres", look for our kernels in Inductor's output
    code, then ``verify`` (zero-init identity and random queries, outputs and gradients)."""
    import torch

    import attnres_compile
    from attnres_compile.kernels import ops

    row = LlamaRow(dtype_name, merge, rtol=LLAMA_RTOL[(device, dtype_name)])
    start = time.monotonic()
    torch._dynamo.reset()
    merge_impl = ops.use_merge_impl(merge) if merge in ops.MERGE_IMPLS else contextlib.nullcontext()
    try:
        with merge_impl:
            layers, num_blocks = llama_layout(device)
            model, ids = tiny_llama(device, getattr(torch, dtype_name), layers)
            config = attnres_compile.AttnResConfig(num_blocks=num_blocks)
            kwargs = {"use_cache": False}
            prepared = attnres_compile.prepare(model, (ids,), config, example_kwargs=kwargs)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():  # non-zero queries: the merge and the scores matter
                for q in prepared.attnres.queries:
                    q.copy_(torch.randn(q.shape, generator=gen).to(q.device) / q.shape[-1] ** 0.5)
            compiled = torch.compile(prepared, backend="attnres")

            def training_step():
                compiled(ids, **kwargs).logits.float().square().mean().backward()

            _, codes = torch._inductor.utils.run_and_get_code(training_step)
            code = "\n".join(codes)
            row.modules = len(codes)
            found = [name for name in our_kernel_names() if name in code] if device != "cpu" else []
            want, unwanted = expected_kernels(device, merge)
            missing = [" or ".join(names) for names in want if not any(n in found for n in names)]
            present = [name for name in unwanted if name in found]
            row.kernels = ", ".join(found) if device != "cpu" else "n/a: the CPU runs the reference path"
            problems = []
            if row.modules < 2:
                problems.append(f"{row.modules} output code modules captured, want forward and backward")
            if missing:
                problems.append(f"missing {', '.join(missing)}")
            if present:
                problems.append(f"unexpected {', '.join(present)}")

            report = attnres_compile.verify(prepared, (ids,), config, example_kwargs=kwargs, rtol=row.rtol)
            row.verify = OK if report.ok else FAILED
            checks = list(report.comparisons)
            row.worst_zero = max((c.max_rel for c in checks if c.check.startswith("zero-init")), default=None)
            row.worst_random = max((c.max_rel for c in checks if c.check.startswith("random")), default=None)
            if not report.ok:
                over = [c.name for c in checks if not c.ok][:3]
                problems.append(f"verify: {', '.join(over + report.failures)}")
                print(report, flush=True)
            row.ok = report.ok and not problems
            row.note = "; ".join(problems)
    except Exception as error:  # one broken row keeps the others
        traceback.print_exc()
        row.note = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    row.seconds = time.monotonic() - start
    return row


def write_llama_table(path: Path, device: str, rows: Sequence[LlamaRow]) -> None:
    import torch

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run)"
    layers, num_blocks = llama_layout(device)
    lines = [
        "# Compiled tiny Llama with backend=\"attnres\"",
        "",
        f"{where}; torch {torch.__version__}. LlamaForCausalLM, {layers} decoder layer(s) ({2 * layers} residual "
        f"steps) x d 48, ids [2, 9], AttnResConfig(num_blocks={num_blocks}), random queries. One training step "
        "compiled and its "
        "Inductor output code searched for our Triton kernels (forward and backward graphs); then "
        "attnres_compile.verify: zero-init identity (compiled rewrite vs eager original) and random queries "
        "(compiled vs eager rewritten reference), outputs and every gradient group, max |got - want| / max |want|.",
        "Tolerance: fp32 1e-4 on CUDA (other reduction orders than eager), 1e-5 on CPU; bf16 5e-2 "
        "(eager rounds each op to bf16, Inductor once per fused kernel: a few roundings of up to "
        "2^-8 each; a kernel slip is O(1)).",
        "",
        "| " + " | ".join(LLAMA_COLUMNS) + " |",
        "|" + "---|" * len(LLAMA_COLUMNS),
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def llama_worker(device: str, out: Path) -> int:
    """Every (dtype, merge) row in turn; the table is rewritten after each row, so a timeout keeps the done ones."""
    rows = []
    for dtype_name, merge in llama_cases(device):
        rows.append(check_llama(device, dtype_name, merge))
        write_llama_table(out, device, rows)
        print(f"llama {dtype_name}/{merge}: {'ok' if rows[-1].ok else 'FAILED'} in {rows[-1].seconds:.1f} s "
              f"{rows[-1].note}", flush=True)
    return 0 if all(r.ok for r in rows) else 1


# --------------------------------------------------------------------------
# Stage 3: the read roofline (benchmarks/bench_read.py)
# --------------------------------------------------------------------------


def faster_merge(rows: dict[str, dict], column: str) -> str:
    """'Triton merge faster (0.412 vs 0.455 ms)' from the two compiled rows of ``column``."""
    times = {name: _float(rows.get(row, {}).get(column, "")) for name, row in COMPILED_MERGE_ROWS.items()}
    if None in times.values():
        return "merge comparison incomplete"
    (fast, t_fast), (_, t_slow) = sorted(times.items(), key=lambda item: item[1])
    return f"{fast} merge faster ({t_fast:.3f} vs {t_slow:.3f} ms)"


def read_stage(ctx: Context) -> Stage:
    table = ctx.results / TABLE_FILES["read"]
    script = [ctx.python, "benchmarks/bench_read.py"]
    if ctx.smoke:
        command = script + ["--smoke", "--out", str(table)]
    else:
        command = script + ["--shape", READ_SHAPE, "--layers", str(READ_LAYERS), "--out", str(table)]
    env = {}
    if ctx.anchors_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ctx.anchors_path), ctx.env.get("PYTHONPATH")) if p)

    def judge(run: StageRun) -> Verdict:
        rows = {r["implementation"]: r for r in table_rows(table)}
        if not rows:
            return Verdict(False, "no read table")
        broken = []
        for name in OUR_READ_ROWS:
            r = rows.get(name)
            err = _float(r["err"]) if r else None
            if r is None or _float(r["fwd ms"]) is None or _float(r["fwd+bwd ms"]) is None or r["note"]:
                broken.append(f"{name}: {r['note'] if r else 'missing'}")
            elif err is None or err > READ_ERR_TOL:
                broken.append(f"{name}: err {r['err']} > {READ_ERR_TOL:g}")
        anchors = [r for name, r in rows.items() if name not in OUR_READ_ROWS]
        timed = [r for r in anchors if _float(r["fwd+bwd ms"]) is not None]
        parts = [f"fwd: {faster_merge(rows, 'fwd ms')}", f"fwd+bwd: {faster_merge(rows, 'fwd+bwd ms')}"]
        triton = rows.get(COMPILED_MERGE_ROWS["Triton"], {})
        if triton.get("fwd+bwd % floor"):
            parts.append(f"Triton merge fwd+bwd at {triton['fwd+bwd % floor']} of the floor")
        if timed:
            best = min(timed, key=lambda r: _float(r["fwd+bwd ms"]))
            parts.append(f"anchors timed {len(timed)}/{len(anchors)}, best fwd+bwd {best['implementation']} "
                         f"{best['fwd+bwd ms']} ms")
        else:
            reasons = sorted({r["note"] for r in anchors})
            parts.append(f"anchors timed 0/{len(anchors)} ({', '.join(reasons)[:60]})")
        parts += broken
        return Verdict(not broken, "; ".join(parts))

    return Stage("read", command, ctx.limits["read"], env, judge)


# --------------------------------------------------------------------------
# Stage 4: end-to-end overhead (benchmarks/bench_e2e.py --overhead)
# --------------------------------------------------------------------------


def e2e_stage(ctx: Context) -> Stage:
    table = ctx.results / TABLE_FILES["e2e"]
    # bench_e2e refuses medians of fewer than 20 timed steps; 2 warm-up steps compile and settle.
    command = [ctx.python, "benchmarks/bench_e2e.py", "--overhead", "--device", ctx.device, "--timed-steps", "20"]
    if ctx.smoke:
        shape = E2E_SHAPE_SMOKE
        command += ["--shapes", shape, "--seq", "16", "--train-batch", "2", "--gpt-vocab", "64", "--warmup-steps", "1"]
    else:
        shape = E2E_SHAPE_CUDA
        command += ["--shapes", shape, "--warmup-steps", "2"]
    command += ["--write", str(table)]
    shape_cell = shape.replace("x", " x ")

    def judge(run: StageRun) -> Verdict:
        row = next((r for r in table_rows(table) if r.get("layers x d") == shape_cell), None)
        if row is None:
            return Verdict(False, f"no {shape_cell} row in the e2e table")
        # Every "<what> ratio" column (attnres / baseline); train, prefill and memory must be there.
        ratios = {column[: -len(" ratio")]: _float(cell) for column, cell in row.items() if column.endswith(" ratio")}
        if any(ratios.get(k) is None for k in ("train", "prefill", "memory")):
            return Verdict(False, f"{shape_cell}: incomplete row")
        figures = ", ".join(f"{k} x{v:.3f}" for k, v in ratios.items() if v is not None)
        return Verdict(True, f"{shape_cell}: {figures} (attnres / baseline)")

    return Stage("e2e", command, ctx.limits["e2e"], {}, judge)


# --------------------------------------------------------------------------
# Stage 5: compile time (benchmarks/bench_compile.py)
# --------------------------------------------------------------------------


def compile_stage(ctx: Context) -> Stage:
    script = REPO / "benchmarks" / "bench_compile.py"
    table = ctx.results / TABLE_FILES["compile"]
    if not script.is_file():
        return Stage("compile", skip_reason="benchmarks/bench_compile.py missing")
    command = [ctx.python, "benchmarks/bench_compile.py"]
    if ctx.smoke:
        # The caller's Inductor cache, not an empty one per arm: only the table's plumbing is looked at.
        command += ["--layers", "1", "--d-model", "32", "--batch", "2", "--seq", "16", "--steps", "1", "--cold-only",
                    "--device", "cpu", "--cache-dir", "inherit"]
    else:
        command += ["--layers", "24", "--d-model", "128", "--device", "cuda"]
    command += ["--out", str(table)]

    def judge(run: StageRun) -> Verdict:
        rows = table_rows(table)
        if not rows:
            return Verdict(False, "no compile table")
        ratio_columns = [c for c in rows[0] if "ratio" in c.lower()]
        if ratio_columns:
            figures = [f"{c} {r[c]}" for r in rows for c in ratio_columns]
        else:
            figures = [", ".join(f"{k} {v}" for k, v in r.items() if v) for r in rows]
        return Verdict(True, "; ".join(figures)[:200])

    return Stage("compile", command, ctx.limits["compile"], {}, judge)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def default_results_folder() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check" if out else REPO / "runs" / "gpu_check"


def prepare_results_folder(folder: Path) -> None:
    """Create it and remove what an earlier run of this script left (only its own file names)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_FILE, LOG_FILE, *TABLE_FILES.values()):
        (folder / name).unlink(missing_ok=True)
    others = sorted(p.name for p in folder.iterdir())
    if others:
        print(f"warning: {folder} holds other files too ({', '.join(others)}): at most "
              f"{MAX_RESULT_FILES} files travel back from a device machine", flush=True)


def parse_limits(items: Sequence[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in STAGES or _float(seconds) is None:
            raise argparse.ArgumentTypeError(f"--limit wants STAGE=SECONDS with STAGE in {', '.join(STAGES)}: {item}")
        limits[name] = float(seconds)
    return limits


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:7]))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: every stage's plumbing")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default $OUT/gpu_check, "
                                                                "else runs/gpu_check)")
    parser.add_argument("--stages", default=",".join(STAGES[1:]),
                        help="comma-separated stages to run after setup (default: all)")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's time limit (repeatable)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run (default {BUDGET_CUDA} on CUDA, {BUDGET_SMOKE} smoke)")
    parser.add_argument("--worker", choices=("llama",), help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.limits = {**(LIMITS_SMOKE if args.smoke else LIMITS_CUDA), **parse_limits(args.limit)}
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    args.selected = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.selected if s not in STAGES[1:]]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES[1:])}")
    return args


STAGE_BUILDERS = {"kernels": kernels_stage, "llama": llama_stage, "read": read_stage, "e2e": e2e_stage,
                  "compile": compile_stage}


def context_lines(ctx: Context, argv: Sequence[str], seconds: float, code: int) -> list[str]:
    m = ctx.machine
    mode = "smoke run on CPU: tiny shapes, timings meaningless" if ctx.smoke else "CUDA"
    return [
        f"`scripts/gpu_check.sh {shlex.join(argv)}` ({mode}); {seconds:.0f} s; exit code {code}.",
        f"Machine: {m.get('device', '?')}; Python {m.get('python', '?')}, torch "
        f"{m.get('torch', '?')}, triton {m.get('triton', '?')}, transformers {m.get('transformers', '?')}.",
        f"Files: {', '.join([SUMMARY_FILE, LOG_FILE, *TABLE_FILES.values()])} (a skipped stage writes none).",
    ]


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker == "llama":
        return llama_worker(args.device or "cuda", args.out)

    results = (args.out or default_results_folder()).resolve()
    prepare_results_folder(results)
    budget = args.budget or (BUDGET_SMOKE if args.smoke else BUDGET_CUDA)
    deadline = time.monotonic() + budget
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` sends SIGTERM: stop the stage's processes too
    log = RunLog(results / LOG_FILE)
    log.note(f"gpu_check {'--smoke ' if args.smoke else ''}(budget {budget:.0f} s) -> {results}", echo=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        ctx = Context(smoke=args.smoke, results=results, scratch=Path(scratch), python=sys.executable,
                      env=base_environment(args.smoke), limits=args.limits)
        try:
            outcomes = [run_setup(ctx, log)]
        except KeyboardInterrupt:
            outcomes = [Outcome("setup", TIMED_OUT, 0.0, "interrupted")]
        stages = [STAGE_BUILDERS[name](ctx) for name in STAGES[1:] if name in args.selected]
        if outcomes[0].status != OK:
            outcomes += [Outcome(s.name, SKIPPED, 0.0, f"setup {outcomes[0].status}") for s in stages]
        else:
            outcomes += run_stages(stages, log, deadline, ctx.env)
    code = exit_code(outcomes)
    seconds = time.monotonic() - log.start
    (results / SUMMARY_FILE).write_text(summary_markdown(outcomes, context_lines(ctx, argv, seconds, code)))
    log.note(f"done in {seconds:.1f} s, exit code {code}")
    log.close()
    print(f"\n== gpu_check summary ({'smoke' if args.smoke else 'cuda'}, {seconds:.0f} s), results in {results} ==")
    print("\n".join(summary_lines(outcomes)), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

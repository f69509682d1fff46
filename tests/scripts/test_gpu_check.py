"""scripts/gpu_check.sh: the smoke run end to end, and the stage runner on trivial commands.

The smoke run (``--smoke``) runs every stage's plumbing on the CPU at tiny
shapes, so that the one GPU check cannot rot between the rare runs on a GPU.
Its timings mean nothing and are not looked at; its tables must exist and hold
their rows.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _run(stages, tmp_path, budget_s=120.0):
    log = gpu_check.RunLog(tmp_path / "run.log", echo=False)
    try:
        return gpu_check.run_stages(stages, log, time.monotonic() + budget_s, dict(os.environ), cwd=tmp_path)
    finally:
        log.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


# --------------------------------------------------------------------------
# The stage runner
# --------------------------------------------------------------------------


def test_a_hanging_stage_is_timed_out_with_its_children_and_the_next_stage_runs(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    hang = _python(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    stages = [
        gpu_check.Stage("hangs", hang, limit_s=2),
        gpu_check.Stage("next", _python("print('next stage ran')"), limit_s=30),
    ]
    start = time.monotonic()
    hung, following = _run(stages, tmp_path)
    assert hung.status == gpu_check.TIMED_OUT and hung.seconds < 2 + gpu_check.KILL_GRACE_SECONDS + 5
    assert following.status == gpu_check.OK
    assert time.monotonic() - start < 30
    assert gpu_check.exit_code([hung, following]) != 0
    assert "next stage ran" in (tmp_path / "run.log").read_text()
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's own child outlived its timeout"


def test_a_failing_stage_sets_a_nonzero_exit_code_and_skipped_stages_do_not(tmp_path):
    failing = gpu_check.Stage("fails", _python("raise SystemExit(3)"), limit_s=30)
    skipped = gpu_check.Stage("absent", skip_reason="benchmarks/absent.py missing")
    passing = gpu_check.Stage("passes", _python("pass"), limit_s=30)
    failed, skip, ok = _run([failing, skipped, passing], tmp_path)
    assert (failed.status, skip.status, ok.status) == (gpu_check.FAILED, gpu_check.SKIPPED, gpu_check.OK)
    assert "exit code 3" in failed.headline and skip.headline == "benchmarks/absent.py missing"
    assert gpu_check.exit_code([failed, skip, ok]) == 1
    assert gpu_check.exit_code([skip, ok]) == 0


def test_the_judge_decides_after_a_clean_exit_and_an_exhausted_budget_skips(tmp_path):
    unhappy = gpu_check.Stage("judged", _python("print('3 rows')"), limit_s=30,
                              judge=lambda run: gpu_check.Verdict("4 rows" in run.output, "want 4 rows"))
    (judged,) = _run([unhappy], tmp_path)
    assert judged.status == gpu_check.FAILED and judged.headline == "want 4 rows"
    (late,) = _run([gpu_check.Stage("late", _python("pass"), limit_s=30)], tmp_path, budget_s=1)
    assert late.status == gpu_check.SKIPPED and "out of time" in late.headline


def test_summary_has_one_line_per_stage():
    outcomes = [gpu_check.Outcome("kernels", gpu_check.OK, 61.23, "58 passed, 3 skipped"),
                gpu_check.Outcome("compile", gpu_check.SKIPPED, 0.0, "benchmarks/bench_compile.py missing")]
    lines = gpu_check.summary_lines(outcomes)
    assert lines == ["kernels  ok          61.2 s  58 passed, 3 skipped",
                     "compile  skipped      0.0 s  benchmarks/bench_compile.py missing"]
    markdown = gpu_check.summary_markdown(outcomes, ["context"])
    assert "| kernels | ok | 61.2 | 58 passed, 3 skipped |" in markdown


# --------------------------------------------------------------------------
# The smoke run
# --------------------------------------------------------------------------


def _table_rows(path: Path) -> list[dict[str, str]]:
    return gpu_check.table_rows(path)


def test_smoke_run_writes_every_table_the_log_and_the_summary(tmp_path):
    results = tmp_path / "gpu_check"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    command = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(results)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail

    # The last lines: one per stage, in order, each with its status and seconds.
    last = proc.stdout.strip().splitlines()[-len(gpu_check.STAGES):]
    for line, stage in zip(last, gpu_check.STAGES, strict=True):
        assert line.split()[0] == stage, tail
        assert any(f" {status} " in line for status in (gpu_check.OK, gpu_check.SKIPPED)), line
        assert " s  " in line, line

    bench_compile = (REPO / "benchmarks" / "bench_compile.py").is_file()
    entries = sorted(results.iterdir())
    assert all(p.is_file() for p in entries), entries  # nothing nested
    assert len(entries) <= gpu_check.MAX_RESULT_FILES
    expected = {"summary.md", "gpu_check.log", "kernels.md", "llama.md", "read.md", "e2e.md"}
    if bench_compile:
        expected.add("compile.md")
    assert {p.name for p in entries} == expected

    kernels = _table_rows(results / "kernels.md")
    assert kernels and sum(int(r["passed"]) for r in kernels) > 0, kernels
    llama = _table_rows(results / "llama.md")
    assert [(r["dtype"], r["result"]) for r in llama] == [("bfloat16", "ok")], llama
    read = _table_rows(results / "read.md")
    assert len(read) == 9 and {r["implementation"] for r in read} >= set(gpu_check.OUR_READ_ROWS), read
    e2e = _table_rows(results / "e2e.md")
    assert len(e2e) == 1 and float(e2e[0]["train ratio"]) > 0, e2e
    if bench_compile:
        assert _table_rows(results / "compile.md")

    summary = _table_rows(results / "summary.md")
    assert [r["stage"] for r in summary] == list(gpu_check.STAGES)
    log = (results / "gpu_check.log").read_text()
    for stage in gpu_check.STAGES:
        assert f"stage {stage}" in log


def test_the_entry_point_stand_in_registers_the_backend_as_an_install_would(tmp_path):
    import tomllib

    folder = gpu_check.write_entry_point_stand_in(tmp_path / "entry_points")
    code = ("import importlib.metadata as m\n"
            "print([(e.name, e.value) for e in m.entry_points(group='torch_dynamo_backends')])")
    env = {**os.environ, "PYTHONPATH": str(folder)}
    # -S: no site-packages, so only the stand-in can answer (not an install of the package).
    found = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert found.stdout.strip() == str(list(project["entry-points"]["torch_dynamo_backends"].items()))


def test_without_a_gpu_the_cuda_run_stops_after_setup(tmp_path):
    results = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    command = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(results)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-len(gpu_check.STAGES):]
    assert last[0].split()[:2] == ["setup", "failed"] and "no CUDA device visible" in last[0]
    assert all(line.split()[1] == "skipped" and "setup failed" in line for line in last[1:]), last
    assert sorted(p.name for p in results.iterdir()) == ["gpu_check.log", "summary.md"]


@pytest.mark.parametrize("argv", [["--stages", "nope"], ["--limit", "read"], ["--limit", "nope=3"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit) as refused:
        gpu_check.parse_args(argv)
    assert refused.value.code == 2

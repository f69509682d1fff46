"""benchmarks/bench_read.py --smoke runs every row's code path and writes its table.

A subprocess: on a CPU-only machine the script sets TRITON_INTERPRET=1 before
importing the package, which must happen before the kernels are decorated.
Timings of a smoke run mean nothing and are not looked at.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OURS_AND_REFERENCE = (
    "reference, eager",
    "reference, torch.compile",
    "ours, Triton merge, eager",
    "ours, Triton merge, torch.compile",
    "ours, aten merge, torch.compile",
)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_smoke_run_fills_every_row(tmp_path):
    out = tmp_path / "read.md"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_read.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {_cells(line)[4]: _cells(line) for line in out.read_text().splitlines() if line.startswith("| 3 | 9 | 3 | 2 |")}
    assert len(rows) == 9, sorted(rows)
    for name in OURS_AND_REFERENCE:
        fwd_ms, fwd_bwd_ms, err, note = rows[name][5], rows[name][7], rows[name][9], rows[name][10]
        assert float(fwd_ms) > 0 and float(fwd_bwd_ms) > 0 and note == "", rows[name]
        # bf16 outputs against the fp32 reference: two roundings (phase 1's o, then h); the
        # CPU interpreter rounds fp32 -> bf16 toward zero, so up to 1 ulp (2^-8) each.
        assert float(err) <= 2e-2, rows[name]
    anchors = [cells for name, cells in rows.items() if name not in OURS_AND_REFERENCE]
    for cells in anchors:
        if not torch.cuda.is_available():
            assert cells[10] == "CUDA only", cells
        assert not cells[10].startswith("failed"), cells

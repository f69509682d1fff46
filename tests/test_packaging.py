"""Packaging: passes/ and kernels/ are ours only as attnres_compile.passes / .kernels.

transformers 5.x depends on Hugging Face's ``kernels`` package and imports it,
so a ``kernels`` is installed beside us. What must never happen is a top-level
``kernels`` or ``passes`` that is *ours*: not from an editable install, not
from a wheel, and not from a Python started in the checkout's root (which has
the root on ``sys.path``).
"""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# argv[1:]: our folders, which no top-level `kernels`/`passes` may resolve to as a package.
# (From the checkout's root they are namespace portions, which never shadow an installed package.)
CHECK_IMPORTS = """
import importlib.util, pathlib, sys
import transformers.activations  # imports Hugging Face's `kernels`
import attnres_compile, attnres_compile.kernels.ops, attnres_compile.passes.pipeline
from attnres_compile.report.diff_html import _style_sheet
import torch
assert ".cell.added" in _style_sheet()  # the package data file
ours = {pathlib.Path(p).resolve() for p in sys.argv[1:]}
def is_ours(location):
    path = pathlib.Path(location).resolve()
    return any(path == o or o in path.parents for o in ours)
import kernels
assert not is_ours(kernels.__file__), f"top-level kernels is ours: {kernels.__file__}"
for name in ("kernels", "passes"):
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin is not None:
        assert not is_ours(spec.origin), f"top-level {name} is a package of ours: {spec.origin}"
assert hasattr(torch.ops.attnres, "block_read")
print(attnres_compile.__file__)
"""


def _ours(root: pathlib.Path) -> list[str]:
    return [str(root / "kernels"), str(root / "passes")]


def _python(code: str, cwd: pathlib.Path, env_path: str = "", args: tuple = ()) -> str:
    env = {"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_installed_package_imports_without_top_level_kernels(tmp_path):
    origin = _python(CHECK_IMPORTS, cwd=tmp_path, args=_ours(ROOT))
    assert origin.startswith(str(ROOT / "attnres_compile"))


def test_built_wheel_holds_only_attnres_compile_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheel_dir)],
        check=True, capture_output=True,
    )
    (wheel,) = wheel_dir.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"attnres_compile"}
    assert "attnres_compile/kernels/ops.py" in names and "attnres_compile/passes/detect.py" in names
    assert "attnres_compile/report/diff.css" in names
    assert "attnres_compile/kernels/cpu_reads.cpp" in names  # the CPU read kernels build from it on first use
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[torch_dynamo_backends]" in entry_points and "attnres = attnres_compile.backend:attnres_backend" in entry_points
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    origin = _python(CHECK_IMPORTS, cwd=tmp_path, env_path=str(target), args=(*_ours(ROOT), *_ours(target)))
    assert origin.startswith(str(target))


def test_a_python_started_in_the_checkout_root_imports_transformers_and_us():
    """The root is sys.path[0] there: our kernels/ must not pose as Hugging Face's."""
    origin = _python(CHECK_IMPORTS, cwd=ROOT, args=_ours(ROOT))
    assert origin.startswith(str(ROOT / "attnres_compile"))


def _collected(*command: str) -> list[str]:
    done = subprocess.run(
        [*command, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_python_m_pytest_collects_what_pytest_collects():
    """``python -m pytest`` puts the root on sys.path; it must find the same tests, importing the same modules."""
    pytest_ids = _collected(str(pathlib.Path(sys.executable).parent / "pytest"))
    assert len(pytest_ids) > 400
    assert _collected(sys.executable, "-m", "pytest") == pytest_ids

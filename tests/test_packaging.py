"""Packaging: passes/ and kernels/ install only as attnres_compile.passes / .kernels.

A top-level ``kernels`` would be taken by ``transformers`` for the Hugging Face
package of that name; neither an editable install nor a wheel may expose one.
"""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHECK_IMPORTS = """
import importlib.util, sys
import attnres_compile, attnres_compile.kernels, attnres_compile.passes
import torch
assert importlib.util.find_spec("kernels") is None, importlib.util.find_spec("kernels")
assert importlib.util.find_spec("passes") is None, importlib.util.find_spec("passes")
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available()
assert hasattr(torch.ops.attnres, "block_read")
print(attnres_compile.__file__)
"""


def _python(code: str, cwd: pathlib.Path, env_path: str = "") -> str:
    env = {"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_installed_package_imports_without_top_level_kernels(tmp_path):
    origin = _python(CHECK_IMPORTS, cwd=tmp_path)
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
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[torch_dynamo_backends]" in entry_points and "attnres = attnres_compile.backend:attnres_backend" in entry_points
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    origin = _python(CHECK_IMPORTS, cwd=tmp_path, env_path=str(target))
    assert origin.startswith(str(target))

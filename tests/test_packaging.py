"""Packaging: passes/ and kernels/ are ours only as attnres_compile.passes / .kernels.

transformers 5.x depends on Hugging Face's ``kernels`` package and imports it,
so a ``kernels`` is installed beside us. What must never happen is a top-level
``kernels`` or ``passes`` that is *ours*: neither an editable install nor a
wheel may expose one.
"""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# argv[1:]: folders that would be ours if a top-level `kernels`/`passes` resolved to them.
CHECK_IMPORTS = """
import importlib.util, pathlib, sys
import attnres_compile, attnres_compile.kernels, attnres_compile.passes
import transformers.activations  # imports Hugging Face's `kernels`
import torch
ours = {pathlib.Path(p).resolve() for p in sys.argv[1:]}
for name in ("kernels", "passes"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        continue
    found = [spec.origin] if spec.origin else []
    found += list(spec.submodule_search_locations or [])
    for location in found:
        path = pathlib.Path(location).resolve()
        assert not any(path == o or o in path.parents for o in ours), f"top-level {name} is ours: {location}"
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
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[torch_dynamo_backends]" in entry_points and "attnres = attnres_compile.backend:attnres_backend" in entry_points
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    origin = _python(CHECK_IMPORTS, cwd=tmp_path, env_path=str(target), args=(*_ours(ROOT), *_ours(target)))
    assert origin.startswith(str(target))

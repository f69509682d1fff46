"""README's two commands are the contract, and .ci/run runs exactly them."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKPOINT = "runs/quickstart.pt"


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- (?:setup|test) command -->\n```bash\n(.+?)\n```", readme)


def test_readme_has_a_setup_and_a_test_command():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "torch==2.13.0" in commands[0] and "examples/quickstart.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in _readme_commands():
        assert command in ci, f".ci/run does not run README's command: {command}"


def _readme_cli_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"<!-- cli commands -->\n```bash\n(.+?)\n```", readme, flags=re.S)
    return [shlex.split(line) for line in block.splitlines()]


def test_readme_cli_commands_run(tmp_path, monkeypatch, capsys):
    from attnres_compile.cli import main

    monkeypatch.chdir(ROOT)
    commands = _readme_cli_commands()
    assert [c[1] for c in commands] == ["inspect", "diff", "plot"]
    for argv in commands:
        assert argv[0] == ".venv/bin/attnres-compile"
        argv = [str(tmp_path / pathlib.Path(a).name) if a.startswith("runs/") and a != CHECKPOINT else a for a in argv[1:]]
        if "examples/quickstart.py:trained_model" in argv and not (ROOT / CHECKPOINT).exists():
            pytest.skip(f"{CHECKPOINT} is written by README's set-up command (examples/quickstart.py)")
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert "layers in 2 blocks" in out
    assert (tmp_path / "diff.html").stat().st_size > 1000 and (tmp_path / "depth_weights.png").stat().st_size > 5000


def test_readme_generation_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"<!-- generate example -->\n```python\n(.+?)\n```", readme, flags=re.S)
    code += "\nassert tokens.shape == (1, 41), tokens.shape\nprint('generated', tokens.shape[1] - 9)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generated 32" in done.stdout
    assert (tmp_path / "ckpt" / "config.json").exists()


def test_readme_checkpoint_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"<!-- checkpoint example -->\n```python\n(.+?)\n```", readme, flags=re.S)
    code += "\nassert model.attnres.queries[0].grad.abs().sum() > 0\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor(" in done.stdout

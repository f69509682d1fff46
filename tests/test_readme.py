"""README's two commands are the contract, and .ci/run runs exactly them."""

import json
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


# Each recipe of README's "Training recipes" and what must hold after it ran.
RECIPE_CHECKS = {
    "checkpoint": "assert model.attnres.queries[0].grad.abs().sum() > 0",
    "trainer": "assert model.attnres.queries[0].abs().sum() > 0  # restored from the Trainer's checkpoint",
    "lora": "assert model.attnres.queries[0].abs().sum() > 0  # trained, saved beside the adapter, restored",
    "autocast": "assert model.attnres.queries[0].grad.abs().sum() > 0",
}

_RUN_RECIPES = """
import json, sys, torch
for name, code in json.load(sys.stdin):
    exec(compile(code, f"README {name} example", "exec"), {"__name__": "__main__"})
    torch._dynamo.reset()
    print("ran", name, flush=True)
"""


def _readme_recipes() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Training recipes"):]
    section = section[: section.index("\n## ", 1)]
    return dict(re.findall(r"<!-- (\w+) example -->\n```python\n(.+?)\n```", section, flags=re.S))


def test_readme_training_recipes_run(tmp_path):
    """Every code block of "Training recipes", in one fresh process (one import of torch and transformers)."""
    recipes = _readme_recipes()
    assert sorted(recipes) == sorted(RECIPE_CHECKS)
    blocks = [(name, code + "\n" + RECIPE_CHECKS[name] + "\n") for name, code in recipes.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    done = subprocess.run([sys.executable, "-c", _RUN_RECIPES], input=json.dumps(blocks), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ran ")] == list(recipes)

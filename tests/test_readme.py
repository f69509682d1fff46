"""README's two commands are the contract, and .ci/run runs exactly them."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


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

"""The ``attnres-compile`` command line: inspect, diff, rewrite, plot, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnres_compile
from attnres_compile.cli import main
from attnres_compile.passes.ir import is_attnres_op
from tiny_gpt import GPTConfig, TinyGPT
from zoo import hf_bert

REPO = Path(__file__).resolve().parents[2]
FACTORY = str(REPO / "examples" / "tiny_gpt.py") + ":TinyGPT"
TOKENS = ["--tokens", "2x8"]


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    """A saved torch.export program of a 2-layer TinyGPT, with its example input."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, d_model=32, vocab_size=64, max_len=16)).eval()
    args = (torch.randint(0, 64, (2, 8)),)
    path = tmp_path_factory.mktemp("programs") / "tiny_gpt.pt2"
    torch.export.save(torch.export.export(model, args, strict=False), str(path))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_a_factory_prints_the_plan_table(capsys):
    code, out, _ = run(capsys, "inspect", FACTORY, *TOKENS, "--num-blocks", "2")
    assert code == 0
    assert "8 layers in 2 blocks" in out and "block 0: layers 0-3  block 1: layers 4-7" in out
    assert out.count("attention") == 4 and out.count(" mlp ") == 4


def test_inspect_json_of_a_program(capsys, program_file):
    code, out, _ = run(capsys, "inspect", program_file, "--json", "--block-size", "3")
    assert code == 0
    data = json.loads(out)
    assert data["origin"] == "exported program" and data["refused"] is None
    assert data["streams"][0]["blocks"] == [[0, 1, 2], [3]]


def test_diff_text_and_html(capsys, tmp_path):
    code, out, _ = run(capsys, "diff", FACTORY, *TOKENS, "--num-blocks", "2")
    assert code == 0 and "attnres" in out and "block_read" in out
    html = tmp_path / "diff.html"
    code, out, _ = run(capsys, "diff", FACTORY, *TOKENS, "--html", html)
    assert code == 0 and f"wrote {html}" in out
    assert html.read_text().lstrip().lower().startswith("<!doctype html")


def test_rewrite_verifies_and_saves_a_program_that_loads_with_its_queries(capsys, program_file, tmp_path):
    out_file = tmp_path / "rewritten.pt2"
    code, out, _ = run(capsys, "rewrite", program_file, out_file, "--num-blocks", "2")
    assert code == 0, out
    assert "attnres verify: OK" in out and "zero-init identity" in out
    original = torch.export.load(str(program_file))
    rewritten = torch.export.load(str(out_file))
    assert any(is_attnres_op(n) for n in rewritten.graph.nodes)
    assert "attnres_queries_0" in rewritten.state_dict
    args, _ = original.example_inputs
    torch.testing.assert_close(rewritten.module()(*args), original.module()(*args), rtol=1e-5, atol=1e-6)


def test_plot_of_a_factory_and_of_a_rewritten_program(capsys, program_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "alpha.png"
    code, out, _ = run(capsys, "plot", FACTORY, png, *TOKENS, "--num-blocks", "2")
    assert code == 0 and png.stat().st_size > 5000
    rewritten = tmp_path / "rewritten.pt2"
    assert run(capsys, "rewrite", program_file, rewritten, "--no-verify")[0] == 0
    png2 = tmp_path / "alpha2.png"
    code, out, _ = run(capsys, "plot", rewritten, png2)
    assert code == 0 and png2.stat().st_size > 5000


def _one_line_error(capsys, *argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert match in err
    return err


def test_bad_files_give_one_line_and_exit_code_2(capsys, tmp_path):
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive")
    _one_line_error(capsys, "inspect", garbage, match="cannot load")
    _one_line_error(capsys, "rewrite", garbage, tmp_path / "out.pt2", match="cannot load")
    _one_line_error(capsys, "plot", tmp_path / "missing.pt2", tmp_path / "a.png", match="no such file")
    _one_line_error(capsys, "inspect", tmp_path / "missing.py:f", match="no such file")
    _one_line_error(capsys, "inspect", "no_colon_here", match="neither a .pt2 file nor module:factory")
    _one_line_error(capsys, "inspect", FACTORY.replace(":TinyGPT", ":Nope"), *TOKENS, match="no callable 'Nope'")


def test_bad_options_give_one_line_and_exit_code_2(capsys):
    _one_line_error(capsys, "inspect", FACTORY, match="--tokens BxT")
    _one_line_error(capsys, "inspect", FACTORY, "--tokens", "2xq", match="sizes like 2x16")
    _one_line_error(capsys, "inspect", FACTORY, *TOKENS, "--num-blocks", "0", match="num_blocks")
    _one_line_error(capsys, "inspect", FACTORY, *TOKENS, "--num-blocks", "2", "--block-size", "2", match="block_size")
    for argv in (["inspect", FACTORY, "--scale", "median"], ["frobnicate"], []):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2


def test_rewrite_of_a_post_norm_program_is_refused(capsys, tmp_path):
    model, args, kwargs = hf_bert()
    path = tmp_path / "bert.pt2"
    torch.export.save(torch.export.export(model, args, kwargs, strict=False), str(path))
    _one_line_error_or_plan = run(capsys, "rewrite", path, tmp_path / "out.pt2")
    code, _, err = _one_line_error_or_plan
    assert code == 2 and "no residual stream" in err and not (tmp_path / "out.pt2").exists()


@pytest.mark.parametrize("command", ["inspect", "diff", "rewrite", "plot"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"attnres-compile {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "attnres-compile"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert result.returncode == 0
    assert all(c in result.stdout for c in ("inspect", "diff", "rewrite", "plot"))

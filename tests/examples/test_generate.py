"""The generate example: a retrofitted Llama generates the original tokens; prefill and decode graphs rewritten."""

import torch

import generate


def test_generate_example_reproduces_the_original_tokens_and_saves(tmp_path):
    result = generate.main(["--layers", "2", "--hidden", "32", "--vocab", "64", "--new-tokens", "12",
                            "--save", str(tmp_path / "checkpoint")])
    assert result["tokens"].shape == (3, 9 + 12)
    assert torch.equal(result["tokens"], result["original"])
    # Prefill, first decode step and one dynamic-length decode graph: never one per token.
    assert 2 <= result["graphs"] <= 3
    assert (tmp_path / "checkpoint" / "config.json").is_file()

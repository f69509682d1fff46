"""verify() itself: it can fail, it restores the model, it measures as documented (tests/test_zoo.py runs it on every family)."""

import pytest
import torch

import attnres_compile
from attnres_compile import AttnResConfig
from zoo import CAUSAL_LMS


def test_verify_detects_a_wrong_rewrite(monkeypatch):
    """The verifier can fail: a rewrite with the wrong scale c_l breaks the zero-init identity."""
    import attnres_compile.passes.reads as reads

    monkeypatch.setattr(reads, "_scale", lambda mode, n: float(n) + 0.5)
    model, args, kwargs = CAUSAL_LMS["tiny_gpt"]()
    report = attnres_compile.verify(model, args, AttnResConfig(num_blocks=2), example_kwargs=kwargs)
    assert not report.ok
    assert "over tolerance" in str(report)


def test_verify_restores_queries_and_mode():
    model, args, _ = CAUSAL_LMS["tiny_gpt"]()
    attnres_compile.prepare(model, args)
    with torch.no_grad():
        model.attnres.queries[0].fill_(0.25)
    model.train()
    report = attnres_compile.verify(model, args)
    assert report.ok, str(report)
    assert model.training
    assert torch.all(model.attnres.queries[0] == 0.25)


def test_verify_reports_a_model_without_stream():
    from zoo import plain_mlp

    model, args, _ = plain_mlp()
    report = attnres_compile.verify(model, args)
    assert not report.ok
    assert "no residual stream" in str(report)


# ---------------------------------------------------------------- analytically zero gradients


def _report_of(got: dict, want: dict):
    from attnres_compile.verify import VerifyReport, _compare_runs

    report = VerifyReport()
    out = [torch.ones(2)]
    _compare_runs(report, "check", (out, got), (out, want), sorted(want), rtol=1e-5)
    return {c.name: c for c in report.comparisons}


def test_a_zero_gradient_is_measured_against_the_largest_gradient():
    """Float noise of ~1e-10 on both sides of a gradient of 3: the group is '~0' and passes."""
    want = {"w": torch.full((3,), 3.0), "bias": torch.tensor([2e-10, -1e-10])}
    got = {"w": torch.full((3,), 3.0), "bias": torch.tensor([-2e-10, 3e-10])}
    comparisons = _report_of(got, want)
    assert comparisons["grad bias"].floored and comparisons["grad bias"].ok
    assert comparisons["grad bias"].max_rel == pytest.approx(4e-10 / 3.0)
    assert not comparisons["grad w"].floored


def test_a_wrong_gradient_where_the_truth_is_zero_still_fails():
    want = {"w": torch.full((3,), 3.0), "bias": torch.zeros(2)}
    got = {"w": torch.full((3,), 3.0), "bias": torch.tensor([1e-3, 0.0])}
    assert not _report_of(got, want)["grad bias"].ok


def test_a_small_nonzero_gradient_keeps_its_own_scale():
    """1e-4 of the largest gradient is above the floor: a 1% error in it fails."""
    want = {"w": torch.full((3,), 3.0), "small": torch.tensor([3e-4])}
    got = {"w": torch.full((3,), 3.0), "small": torch.tensor([3.03e-4])}
    small = _report_of(got, want)["grad small"]
    assert not small.floored and not small.ok

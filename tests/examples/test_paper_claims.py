"""The paper-claims run end to end (--quick): every section trained, every CSV row there, sane numbers, plots."""

import csv
import json
import math

import paper_claims


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def strict_json(path):
    """The summary, refusing NaN and infinity (which JSON does not have)."""
    def refuse(constant):
        raise ValueError(f"summary.json holds {constant}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def expected_steps(args, variants):
    """Steps of every run the quick run must have trained: {run: (steps, seeds)}."""
    runs = {paper_claims.multiplier_label(m): (round(m * args.steps), args.seeds) for m in args.multipliers}
    runs.update({v.name: (args.steps, args.seeds) for v in variants})
    retrofit = round(args.retrofit_ratio * args.steps)
    runs.update({"retrofit_plain": (retrofit, args.seeds), "retrofit_attnres": (retrofit, args.seeds)})
    runs.update({f"d{args.width}_{arm}": (args.steps, args.width_seeds) for arm in ("baseline", "attnres")})
    return runs


def test_quick_run_trains_every_section_and_writes_sane_outputs(tmp_path):
    result = paper_claims.main(["--quick", "--out", str(tmp_path)])
    args, paths = result["args"], result["paths"]
    variants = paper_claims.block_variants(args)
    expected = expected_steps(args, variants)

    runs = read_csv(paths["runs.csv"])
    trained = {(r["run"], int(r["seed"])) for r in runs}
    assert trained == {(run, s) for run, (_, seeds) in expected.items() for s in seeds}
    for row in runs:
        assert int(row["steps"]) == expected[row["run"]][0]
        assert math.isfinite(float(row["val_loss"])) and 0 < float(row["val_loss"]) < math.log(256)
        if "attnres" in row["run"]:
            assert float(row["query_norm"]) > 1e-3, f"{row['run']}: the optimizer must train the queries"

    for section in paper_claims.SECTIONS:
        curves = read_csv(paths[f"{section}.csv"])
        for run in paper_claims.section_runs(section, args, variants):
            steps, seeds = expected[run]
            for seed in seeds:
                rows = [r for r in curves if r["run"] == run and int(r["seed"]) == seed]
                assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)), (section, run, seed)
                assert all(math.isfinite(float(r["train_loss"])) for r in rows)

    summary = strict_json(paths["summary.json"])
    assert summary == json.loads(json.dumps(paper_claims.finite_or_none(result["summary"])))
    equivalence = summary["compute_equivalence"]
    assert equivalence["baseline_val_loss"]["2"]["mean"] < equivalence["baseline_val_loss"]["1"]["mean"] - 0.2
    multipliers = equivalence["multiplier"]["per_seed"]
    assert set(multipliers) == {str(s) for s in args.seeds}
    assert all(m is not None and 0 < m < 1e6 for m in multipliers.values()), multipliers
    assert equivalence["multiplier_pooled"] is not None and equivalence["multiplier_pooled"] > 0
    assert equivalence["net_of_flops"] is not None and equivalence["net_of_step_time"] is not None

    overhead = summary["overhead"]
    assert overhead["flops"]["baseline"]["reads"] == 0 < overhead["flops"]["attnres"]["reads"]
    assert overhead["flops"]["attnres"]["matmul"] == overhead["flops"]["baseline"]["matmul"]
    assert 1.0 < overhead["flops_ratio"] < 1.2
    assert overhead["step_time_ratio"] > 0

    ablation = summary["block_ablation"]
    assert [e["num_blocks"] for e in ablation["entries"]] == [*sorted(args.ablation_blocks), paper_claims.FULL]
    assert ablation["entries"][-1]["blocks"] == ablation["residual_steps"]  # Full AttnRes: one block per step
    assert all(e["val_loss"]["mean"] is not None for e in ablation["entries"])

    # The rewrite of the trained baseline starts where the baseline is: zero queries, scale "count".
    first = summary["retrofit"]["first_step_train_loss"]
    assert math.isclose(first["retrofit_plain"], first["retrofit_attnres"], rel_tol=1e-5)
    assert summary["scale_mode"]["mean_minus_count"]["mean"] is not None
    assert [w["d_model"] for w in summary["widths"]] == [args.d_model, args.width]

    depth = summary["depth_weights"]
    for row in depth["weights"]:
        assert math.isclose(sum(v for v in row if v is not None), 1.0, abs_tol=1e-3)

    for name in ("loss_curves.png", "loss_vs_compute.png", "loss_vs_blocks.png", "depth_weights.png"):
        with open(paths[name], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name

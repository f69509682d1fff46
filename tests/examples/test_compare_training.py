"""The training comparison runs end to end: both arms, every seed, finite losses, moving queries, CSV and PNG."""

import csv
import math

import compare_training


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_comparison_writes_curves_summary_and_plot(tmp_path):
    result = compare_training.main(["--quick", "--out", str(tmp_path)])
    args, paths = result["args"], result["paths"]
    seeds = {str(s) for s in args.seeds}

    curves = read_csv(paths["curves.csv"])
    assert len(curves) == len(compare_training.ARMS) * len(args.seeds) * args.steps
    for arm in compare_training.ARMS:
        for seed in seeds:
            rows = [r for r in curves if r["arm"] == arm and r["seed"] == seed]
            assert [int(r["step"]) for r in rows] == list(range(1, args.steps + 1))
            assert all(math.isfinite(float(r["train_loss"])) for r in rows)
            assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.5, "training must lower the loss"
    # Same initial weights and batches: the first step's loss is the same in both arms (the rewrite is exact at init).
    for seed in seeds:
        first = {r["arm"]: float(r["train_loss"]) for r in curves if r["seed"] == seed and r["step"] == "1"}
        assert math.isclose(first["baseline"], first["attnres"], rel_tol=1e-5)

    summary = read_csv(paths["summary.csv"])
    assert {(r["arm"], r["seed"]) for r in summary} == {(a, s) for a in compare_training.ARMS for s in seeds}
    for row in summary:
        assert math.isfinite(float(row["val_loss"])) and 0 < float(row["val_loss"]) < math.log(256)
        if row["arm"] == "attnres":
            assert float(row["query_norm"]) > 1e-3, "the optimizer must train the queries"
        else:
            assert float(row["query_norm"]) == 0.0

    with open(paths["loss_curves.png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

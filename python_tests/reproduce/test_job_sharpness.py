"""`landscape-kernels reproduce sharpest-directions` and `reproduce nsgd` end to end (--quick)."""
import json

import pytest

from landscape_kernels.cli import main


def test_sharpest_directions_quick_run_reports_every_setting_and_resumes(tmp_path, capsys):
    out = tmp_path / "sd"
    assert main(["reproduce", "sharpest-directions", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["runs"]) == {"B128_lr0.1", "B128_lr0.01", "B16_lr0.05", "B256_lr0.05"}
    for r in s["runs"].values():
        ms = r["measurements"]
        steps = [m["step"] for m in ms]
        assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == r["epochs"] * r["steps_per_epoch"]
        assert r["peak_lambda1"] == max(m["eigenvalues"][0] for m in ms) > 0
        assert all(m["eigenvalues"] == sorted(m["eigenvalues"], reverse=True) for m in ms)
        assert all(m["residuals"][0] <= 1e-3 * abs(m["eigenvalues"][0]) * 1.01 for m in ms)
        analysed = [m for m in ms if "decomposed" in m]
        assert len(analysed) == 2  # --quick: the first two measurements
        d = analysed[0]["decomposed"]
        assert d["labels"][-2:] == ["random", "full step"] and len(d["mean_changes"]) == 3 + 2
        assert len(analysed[0]["cross_sections"]["losses"]) == 3
        assert 0 < r["test_accuracy"] <= 1 and r["final_frobenius"] > 0
    claims = [c["claim"] for c in s["checks"]]
    assert any("falls as lr grows" in c for c in claims) and any("rises with B" in c for c in claims)
    assert any("γ = 1 step along e_1" in c for c in claims)
    report = (out / "report.md").read_text()
    assert "## Paper's claims" in report and "| 16 | 0.05 |" in report
    pytest.importorskip("matplotlib")
    for name in ("fig_lambda1.png", "fig_decomposed_step.png"):
        assert (out / name).stat().st_size > 1000 and f"]({name})" in report
    capsys.readouterr()
    assert main(["reproduce", "sharpest-directions", "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert "done before, reusing" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["runs"] == s["runs"]


def test_nsgd_quick_run_compares_each_gamma_with_sgd(tmp_path):
    out = tmp_path / "nsgd"
    assert main(["reproduce", "nsgd", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [r["gamma"] for r in s["runs"].values()] == [0.1, 1.0, 5.0]
    for r in s["runs"].values():
        assert len(r["training"]) == 3 and len(r["measurements"]) == 3 + 1  # each epoch start, and the end
    losses = {r["gamma"]: r["training"][-1]["full_loss"] for r in s["runs"].values()}
    assert len(set(losses.values())) == 3  # the nudge changes the trajectory
    assert len(s["checks"]) == 4 and "| 5 |" in (out / "report.md").read_text()


def test_nsgd_without_the_sgd_baseline_is_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "nsgd", "--dataset", "digits", "--gammas", "0.1,5", "--out", str(tmp_path / "n"), "--no-progress"])
    assert code == 2 and "gammas must include 1" in capsys.readouterr().err


def test_frobenius_probes_can_be_skipped_but_not_for_nsgd(tmp_path, capsys):
    out = tmp_path / "sd"
    assert main(["reproduce", "sharpest-directions", "--quick", "--out", str(out), "--no-progress", "--lrs", "0.1",
                 "--batch-sizes", "16", "--epochs", "1", "--frobenius-probes", "0", "--step-analyses", "0"]) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs and all(r["final_frobenius"] is None and r["peak_lambda1"] > 0 for r in runs.values())
    assert main(["reproduce", "nsgd", "--quick", "--out", str(tmp_path / "n"), "--no-progress",
                 "--frobenius-probes", "0"]) == 2
    assert "frobenius_probes must be >= 1 for nsgd" in capsys.readouterr().err


def test_simple_cnn_on_the_8x8_digits_is_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "sharpest-directions", "--dataset", "digits", "--model", "simple_cnn",
                 "--out", str(tmp_path / "s"), "--no-progress"])
    assert code == 2 and "28 x 28" in capsys.readouterr().err


def test_nsgd_checks_compare_with_the_sgd_run():
    from landscape_kernels.reproduce.nsgd import checks

    def run(gamma, losses, lam, frob, acc):
        return {"gamma": gamma, "training": [{"full_loss": v} for v in losses], "final_lambda1": lam,
                "final_frobenius": frob, "test_accuracy": acc}

    runs = {"a": run(0.1, [1.0, 0.5], 8.0, 15.0, 0.97), "b": run(1.0, [1.0, 0.6], 6.0, 12.0, 0.968),
            "c": run(5.0, [1.0, 0.9], 3.0, 7.0, 0.91)}
    assert [c["holds"] for c in checks(runs)] == [True, True, True, True]
    runs["a"] = run(0.1, [1.2, 0.5], 5.0, 15.0, 0.95)  # slower on average, flatter, worse
    assert [c["holds"] for c in checks(runs)] == [False, False, False, True]


def test_sharpest_directions_checks_need_strict_order():
    from landscape_kernels.reproduce.sharpest_directions import SharpestDirectionsConfig, checks

    def run(B, lr, peak):
        return {"batch_size": B, "lr": lr, "peak_lambda1": peak, "peak_at_end": False, "measurements": []}

    cfg = SharpestDirectionsConfig(lrs=(0.4, 0.1), batch_sizes=(8, 1024))
    rows = [{"group": "lr", "folder": "l1", "batch_size": 128, "lr": 0.1},
            {"group": "lr", "folder": "l4", "batch_size": 128, "lr": 0.4},
            {"group": "batch", "folder": "b8", "batch_size": 8, "lr": 0.05},
            {"group": "batch", "folder": "b1024", "batch_size": 1024, "lr": 0.05}]
    runs = {"l1": run(128, 0.1, 17.0), "l4": run(128, 0.4, 9.0), "b8": run(8, 0.05, 13.0), "b1024": run(1024, 0.05, 12.0)}
    lr_check, b_check = checks(cfg, rows, runs)
    assert lr_check["holds"] and not b_check["holds"] and lr_check["caveat"] is None

"""`landscape-kernels reproduce phases` end to end (--quick), its data and its claim checks."""
import json

import torch

from landscape_kernels.cli import main
from landscape_kernels.reproduce.phases import PhasesConfig, checks, load_data


def test_phases_quick_run_reports_each_rho_and_resumes(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["reproduce", "phases", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["runs"]) == {"rho0", "rho0.2"}
    clean, noisy = s["runs"]["rho0"], s["runs"]["rho0.2"]
    assert len(clean["records"]) == 30 and "auc" not in clean["records"][0] and "cleaning" not in clean
    rec = noisy["records"][-1]
    for key in ("test_error", "ensemble_alignment", "ensemble_amplitude", "cos_cw", "strength_wc", "auc",
                "train_error_wrong"):
        assert key in rec, key
    assert -1 <= rec["cos_cw"] <= 1 and 0.5 <= rec["auc"] <= 1
    c = noisy["cleaning"]
    assert c["removed"] == 200 and 0 <= c["precision"] <= 1 and c["left_mislabeled"] == 200 - round(c["precision"] * 200)
    assert len(c["test_error"]) == 30
    assert (out / "rho0.2" / "losses.npz").is_file()
    report = (out / "report.md").read_text()
    assert "ρ = 0: two phases" in report and "cleaning in phase II improves" in report
    for fig in ("fig_test_error.png", "fig_order_parameters.png", "fig_loss_histograms.png"):
        assert fig in report and (out / fig).is_file()
    capsys.readouterr()
    assert main(["reproduce", "phases", "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert "done before" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["runs"] == s["runs"]


def test_label_noise_changes_exactly_rho_of_the_labels():
    cfg = PhasesConfig(quick=True).resolved()
    (x, y), wrong, test = load_data(cfg, 0.2)
    (_, y0), wrong0, _ = load_data(cfg, 0.0)
    assert int(wrong.sum()) == 200 and not wrong0.any()
    assert torch.equal(y[~wrong], y0[~wrong]) and bool((y[wrong] != y0[wrong]).all())


def test_bad_settings_are_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "phases", "--quick", "--noise", "0,1.5", "--out", str(tmp_path / "p")])
    assert code == 2 and "noise must list fractions in [0, 1)" in capsys.readouterr().err


def test_checks_follow_the_phase_counts():
    def run(rho, starts, phase, cleaned, final):
        r = {"rho": rho, "phases": {"starts": starts, "rise": 0.1}, "phase_epochs": starts, "final_test_error": final,
             "best_test_error": final / 2}
        if rho:
            r["auc_peak"] = {"auc": 0.9, "epoch": 10, "phase": phase}
            r["cleaning"] = {"final_test_error": cleaned, "precision": 0.8, "recall": 0.8}
        return r

    held = [c["holds"] for c in checks({"a": run(0, [0, 5], 0, 0, 0.1), "b": run(0.2, [0, 5, 9, 14], 1, 0.05, 0.1)})]
    assert held == [True, True, True, True]
    held = [c["holds"] for c in checks({"b": run(0.2, [0, 5], 1, 0.2, 0.1)})]
    assert held == [False, False, False]

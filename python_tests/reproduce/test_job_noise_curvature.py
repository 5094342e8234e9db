"""`landscape-kernels reproduce noise-curvature` end to end (--quick) and its claim checks."""
import json

from landscape_kernels.cli import main
from landscape_kernels.reproduce.noise_curvature import checks


def test_noise_curvature_quick_run_reports_both_losses_and_resumes(tmp_path, capsys):
    out = tmp_path / "nc"
    assert main(["reproduce", "noise-curvature", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["by_loss"]) == {"ce", "mse"}
    for name in ("ce_seed0", "mse_seed0"):
        rel = s["runs"][name]["relation"]
        assert rel["top"] == 60 and 3 <= rel["used"] <= 60
        assert len(rel["eigenvalues"]) == 144  # the 12 x 12 hidden matrix
        assert 0 < rel["gamma"]["r2"] <= 1 and rel["random_commutator"] > 0
        assert (out / name / "model.pt").is_file() and not (out / name / "checkpoint.pt").exists()
    report = (out / "report.md").read_text()
    assert "γ_CE in (1, 2]" in report and "| cross-entropy | 1 |" in report
    assert "fig_c_vs_h.png" in report and (out / "fig_c_vs_h.png").is_file()
    capsys.readouterr()
    assert main(["reproduce", "noise-curvature", "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert "done before" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["runs"] == s["runs"]


def test_noise_curvature_bad_settings_are_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "noise-curvature", "--quick", "--losses", "ce,hinge", "--out", str(tmp_path / "n")])
    assert code == 2 and "losses must be" in capsys.readouterr().err
    code = main(["reproduce", "noise-curvature", "--dataset", "digits", "--per-class", "500", "--out", str(tmp_path / "n")])
    assert code == 2 and "exceeds the smallest class" in capsys.readouterr().err


def _by(ce, mse, commutator=0.1, random=1.0):
    def stat(v):
        return {"mean": v, "std": 0.0, "values": [v]}

    return {name: {"gamma": stat(g), "commutator": stat(commutator), "random_commutator": stat(random)}
            for name, g in (("ce", ce), ("mse", mse))}


def test_noise_curvature_checks_follow_the_stated_bounds():
    held = {c["claim"]: c["holds"] for c in checks(_by(1.3, 1.0))}
    assert all(held.values())
    held = {c["claim"]: c["holds"] for c in checks(_by(1.0, 1.35, commutator=0.3))}
    assert not held["γ_CE in (1, 2]"] and not held["γ_MSE in [0.8, 1.3]"] and not held["γ_CE > γ_MSE"]
    assert not any(v for k, v in held.items() if "far below" in k)

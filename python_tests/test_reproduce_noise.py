"""`landscape-kernels reproduce noise-curvature` end to end (--quick) and its claim checks."""
import json
import os

import pytest

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


def test_escape_rate_quick_run_has_every_part_and_resumes(tmp_path, capsys):
    out = tmp_path / "er"
    assert main(["reproduce", "escape-rate", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [r["batch_size"] for r in s["stationary"]["rows"]] == [1, 4]
    assert all(r["phi"] > 1 and r["theory"] == 1 + r["batch_size"] / (0.1 * r["h"]) for r in s["stationary"]["rows"])
    (passage,) = s["passage"]["rows"]
    assert passage["dim"] == 2 and passage["mean_times"] == sorted(passage["mean_times"])  # higher c takes longer
    assert len(passage["datasets"]) == 2 and passage["datasets"][0]["seed"] != passage["datasets"][1]["seed"]
    assert passage["slope"] == pytest.approx(sum(d["slope"] for d in passage["datasets"]) / 2)
    assert passage["sde_times"] == sorted(passage["sde_times"]) and 0 < passage["sde_slope"] < passage["theory"]
    assert len(s["noise"]["noise_strength"]) == 13 and all(v > 0 for v in s["noise"]["noise_strength"])
    assert [len(p["A"]) for p in s["decoupling"]["spectra"]] == [300, 300]
    claims = [c["claim"] for c in s["checks"]]
    assert len(claims) == 6 and any("decoupled spectra" in c for c in claims)
    assert sum("first-passage slope" in c for c in claims) == 2
    report = (out / "report.md").read_text()
    assert "## First passage" in report and "fig_decoupling.png" in report
    capsys.readouterr()
    assert main(["reproduce", "escape-rate", "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert "stationary: done before" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["passage"] == s["passage"]


def test_escape_rate_resumes_an_interrupted_mlp_part(tmp_path):
    """A run stopped after epoch 5 and resumed measures what an uninterrupted run measures."""
    from dataclasses import replace

    from landscape_kernels.reproduce import escape_rate as er

    cfg = er.EscapeRateConfig(parts=("noise",), quick=True)
    full = er.run(cfg, str(tmp_path / "full"), log=lambda *a: None)["noise"]
    er.run(replace(cfg, quick=False, dataset="digits", train_samples=1000, hidden=24, noise_epochs=5),
           str(tmp_path / "cut"), log=lambda *a: None)
    os.remove(tmp_path / "cut" / "parts.json")  # as if the job had been killed before the part ended
    again = er.run(cfg, str(tmp_path / "cut"), resume=True, log=lambda *a: None)["noise"]
    assert again["noise_strength"] == full["noise_strength"] and again["loss"] == full["loss"]


def test_escape_rate_bad_parts_are_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "escape-rate", "--quick", "--parts", "linear,forward", "--out", str(tmp_path / "e")])
    assert code == 2 and "parts must be" in capsys.readouterr().err
    code = main(["reproduce", "escape-rate", "--parts", "linear", "--passage-datasets", "0", "--out", str(tmp_path / "e")])
    assert code == 2 and "passage_datasets must be" in capsys.readouterr().err

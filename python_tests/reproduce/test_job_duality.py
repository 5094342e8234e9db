"""`landscape-kernels reproduce duality` end to end (--quick), its data, training rule and claim checks."""
import json

import pytest
import torch

from landscape_kernels.cli import main
from landscape_kernels.reproduce.duality import DualityConfig, QUICK_SWEEPS, checks, load_data, sweep_summary
from testing import assert_report_and_resume


def test_duality_quick_run_reports_every_sweep_and_resumes(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["reproduce", "duality", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["by_sweep"]) == set(QUICK_SWEEPS)
    assert len(s["runs"]) == 1 + len(QUICK_SWEEPS)  # the baseline shared by every sweep
    for name, r in s["runs"].items():
        d = r["decomposition"]
        assert d["identity_residual"] < 1e-10 and d["duality_error"] < 1e-10, name
        assert d["pairs"] + d["pairs_without_dual"] == 359 and d["weight_norm"] > 0
        assert set(d["top_share"]) == {"0.01", "0.05", "0.1", "0.25"}
        assert not (out / "runs" / name / "checkpoint.pt").exists()
    for sweep, members in s["members"].items():
        assert [v for v, _ in members] == sorted(v for v, _ in members) and len(members) == 2, sweep
    _, again = assert_report_and_resume(
        "duality", out, ["the estimate tracks the real gap across the lr sweep", "## dropout"],
        ["fig_gap_vs_estimate.png", "fig_spectra.png", "fig_factors.png", "fig_sigma_w_vs_norm.png"], capsys)
    assert again["runs"] == s["runs"]


def test_label_noise_adds_mislabeled_samples_on_top_of_the_correct_ones():
    cfg = DualityConfig(quick=True).resolved()
    train, correct, test = load_data(cfg, 60, 0.2)
    assert correct[0].shape[0] == 600 and train[0].shape[0] == 600 + 150
    assert torch.equal(train[0][:600], correct[0]) and torch.bincount(correct[1]).tolist() == [60] * 10
    assert test[0].shape[0] == 359
    bigger = load_data(cfg, 100, 0.0)[1]  # a larger training set holds the smaller one
    rows = {tuple(r.tolist()) for r in bigger[0]}
    assert all(tuple(r.tolist()) in rows for r in correct[0])


def test_bad_settings_are_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "duality", "--quick", "--sweeps", "lr,momentum", "--out", str(tmp_path / "d")])
    assert code == 2 and "unknown ['momentum']" in capsys.readouterr().err
    code = main(["reproduce", "duality", "--dataset", "digits", "--per-class", "500", "--sweeps", "lr",
                 "--out", str(tmp_path / "d")])
    assert code == 2 and "exceeds class" in capsys.readouterr().err


def _runs(values, gap, estimate, sigma_g, sigma_w, norm, share=0.7):
    runs, members = {}, []
    for v, a, b, g, w, n in zip(values, gap, estimate, sigma_g, sigma_w, norm):
        name = f"p{v}_seed0"
        runs[name] = {"test_accuracy": 0.9, "decomposition": {
            "real_gap": a, "estimate": b, "sigma_g_total": g, "sigma_w_total": w, "weight_norm": n,
            "top_share": {"0.1": share}}}
        members.append((v, name))
    return runs, members


@pytest.mark.parametrize("sweep,holds", [("batch_size", True), ("lr", False)])
def test_checks_follow_the_stated_criteria(sweep, holds):
    # sharpness grows 50 % along the grid: the batch-size expectation (it grows with B) holds, the
    # learning-rate one (it falls with the lr) does not; the estimate tracks the gap with slope 1
    runs, members = _runs([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], [0.11, 0.21, 0.31, 0.41], [1.0, 1.1, 1.3, 1.5],
                          [1.0, 1.0, 1.01, 1.0], [5, 5, 5, 5])
    by = {sweep: sweep_summary(runs, members)}
    got = {c["claim"].split(" (")[0]: c["holds"] for c in checks(runs, {sweep: members}, by)}
    assert got[f"the estimate tracks the real gap across the {sweep} sweep"]
    assert got["a few sharp directions dominate: the top 10% of directions"] is True
    assert got[f"{sweep} acts through sharpness"] is holds

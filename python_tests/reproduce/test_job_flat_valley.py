"""`landscape-kernels reproduce flat-valley` end to end (--quick), its failure boundary and its checks."""
import json

import pytest

from landscape_kernels.cli import main
from landscape_kernels.reproduce.flat_valley import checks, crossing
from testing import assert_report_and_resume


def test_flat_valley_quick_run_reports_every_part_and_resumes(tmp_path, capsys):
    out = tmp_path / "fv"
    assert main(["reproduce", "flat-valley", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    d = s["drift"]
    assert len(d["rows"]) == 4 and d["gd"]["end_sharpness"] == pytest.approx(d["start_sharpness"], rel=1e-3)
    for r in d["rows"]:
        assert len(r["mean_position"]) == len(r["theory"]["mean_position"]) == 1500 // 20 + 1
        assert abs(r["relative_error"]) < 0.05 and r["failed"] == 0  # the theory holds at these settings
    n = s["noise"]
    assert [r["scale"] for r in n["rows"]] == [0.5, 1.0, 2.0, 3.0, 5.0, 8.0]
    assert n["rows"][0]["failed"] == 0 and n["rows"][-1]["failed"] > 0.9 and 1 < n["theory_bound"] < 10
    net = s["network"]
    assert len(net["runs"]) == 2 and len(net["settings"]) == 2
    run = net["runs"][0]
    assert len(run["lambda1"]) == len(run["intervals"]) + 1 == len(run["snapshot_epochs"])
    assert all(h["straight"] >= 0 and h["trajectory"] >= 0 for h in run["intervals"])
    assert (out / "network" / "lr0.05_B25_seed0" / "result.json").is_file()
    assert not (out / "network" / "lr0.05_B25_seed0" / "checkpoint.pt").exists()
    _, again = assert_report_and_resume(
        "flat-valley", out, ["SGD ends flatter than GD", "more noise freezes later"],
        ["fig_valley_paths.png", "fig_flatness_vs_noise.png", "fig_network_freezing.png"], capsys)
    assert again["drift"] == s["drift"] and again["network"] == s["network"]


def test_bad_settings_are_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "flat-valley", "--quick", "--start-sharpness", "0.5", "--out", str(tmp_path / "f")])
    assert code == 2 and "start_sharpness must exceed 1" in capsys.readouterr().err
    code = main(["reproduce", "flat-valley", "--quick", "--parts", "drift,nope", "--out", str(tmp_path / "f")])
    assert code == 2 and "parts must be" in capsys.readouterr().err


def test_crossing_interpolates_in_log_scale():
    assert crossing([1, 2, 4], [0.0, 0.2, 0.8], 0.5) == pytest.approx(2 ** 1.5)
    assert crossing([1, 2], [0.0, 0.1], 0.5) is None


def test_checks_hold_and_fail_on_their_numbers():
    def drift_row(lr, B, drift, end, err=0.01):
        return {"lr": lr, "batch_size": B, "drift_per_step": drift, "end_sharpness_median": end, "relative_error": err}

    drift = {"gd": {"end_sharpness": 3.0}, "rows": [drift_row(0.05, 1, 2.0, 1.2), drift_row(0.05, 4, 0.5, 2.0),
                                                   drift_row(0.1, 1, 8.0, 1.0), drift_row(0.1, 4, 2.0, 1.1)]}
    noise = {"rows": [{"scale": s, "failed": f, "median_steps_to_flat": t}
                      for s, f, t in ((0.5, 0, 500), (1, 0, 150), (2, 0.1, 40), (4, 0.9, 10))],
             "measured_bound": 3.5, "theory_bound": 4.0}
    held = [c["holds"] for c in checks({"drift": drift, "noise": noise})]
    assert held == [True, True, True, True, True]
    drift["rows"][1]["drift_per_step"] = 3.0  # larger B drifting faster
    drift["rows"][0]["relative_error"] = 0.2
    noise["measured_bound"] = 2.0
    held = [c["holds"] for c in checks({"drift": drift, "noise": noise})]
    assert held == [True, False, False, True, False]

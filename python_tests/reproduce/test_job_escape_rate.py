"""`landscape-kernels reproduce escape-rate` end to end (--quick), its resumption and its bad settings."""
import json
import os

import pytest

from landscape_kernels.cli import main


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
    os.remove(tmp_path / "cut" / "job.json")  # a folder of an earlier version: only the trainer checks its settings
    again = er.run(cfg, str(tmp_path / "cut"), resume=True, log=lambda *a: None)["noise"]
    assert again["noise_strength"] == full["noise_strength"] and again["loss"] == full["loss"]


def test_escape_rate_bad_parts_are_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "escape-rate", "--quick", "--parts", "linear,forward", "--out", str(tmp_path / "e")])
    assert code == 2 and "parts must be" in capsys.readouterr().err
    code = main(["reproduce", "escape-rate", "--parts", "linear", "--passage-datasets", "0", "--out", str(tmp_path / "e")])
    assert code == 2 and "passage_datasets (--passage-datasets) must be" in capsys.readouterr().err

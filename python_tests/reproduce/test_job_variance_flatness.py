"""The main job end to end: `landscape-kernels reproduce variance-flatness --quick` and its report."""
import json
import os

import pytest

from landscape_kernels.cli import main


def test_variance_flatness_quick_run_writes_the_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "variance-flatness", "--quick", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "digits" and summary["training"]["epochs"] == 40
    assert summary["psi"]["psi"] > 0 and summary["pca"]["gamma"] > 0  # digits: a power law and psi > 0
    assert len(summary["flatness"]["widths"]) == len(summary["pcs"])
    assert {"training", "pca", "flatness", "mlf", "temperature"} <= set(summary["timings_s"])
    report = (out / "report.md").read_text()
    assert "Checkable numbers" in report and "psi > 0" in report
    pytest.importorskip("matplotlib")
    for name in ("fig1_spectrum.png", "fig2_flatness.png", "fig3_mlf.png", "fig5_temperature.png"):
        assert (out / name).stat().st_size > 1000 and f"]({name})" in report
    # resumed: training is already complete, the analysis gives the same numbers
    assert main(["reproduce", "variance-flatness", "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["psi"] == summary["psi"] and again["pca"]["n90"] == summary["pca"]["n90"]
    assert "resumed from" in capsys.readouterr().out


def test_optimizer_width_layer_and_subset_reach_training_and_analysis(tmp_path):
    import torch

    out = tmp_path / "adam"
    args = ["reproduce", "variance-flatness", "--quick", "--out", str(out), "--no-progress", "--optimizer", "adam",
            "--hidden", "20,12", "--layer", "1", "--train-samples", "400", "--max-epochs", "25", "--window", "150"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["analysed_parameter"] == "0.weight" and summary["config"]["lr"] == 0.001  # Adam's default lr
    assert summary["training"]["steps"] == 25 * (400 // 50)  # trained on the 400-sample subset
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["model"]["0.weight"].shape == (20, 64) and state["model"]["2.weight"].shape == (12, 20)
    assert all("exp_avg" in v for v in state["optimizer"]["state"].values())  # Adam did the steps
    window = state["callbacks"][0]["buffer"]
    assert window.shape == (150, 20 * 64)  # snapshots of W1, the analysed matrix
    assert torch.equal(window[(summary["training"]["steps"] - 1) % 150].reshape(20, 64) != 0,
                       torch.ones(20, 64, dtype=torch.bool))
    assert "hidden widths 20-12" in (out / "report.md").read_text() and "snapshots of W1" in (out / "report.md").read_text()


def test_the_papers_tolerances_apply_only_to_its_system():
    from landscape_kernels.reproduce.variance_flatness import VarianceFlatnessConfig, checks, is_reference_system

    summary = {"pca": {"gamma": 2.5, "n90": 35, "cos_p1_mean": 0.9, "ratio_12": 100.0}, "psi": {"psi": 4.0}}
    assert all(r["applies"] for r in checks(summary, "mnist", True))
    assert [r["quantity"] for r in checks(summary, "mnist", False) if r["applies"]] == ["psi > 0"]
    assert is_reference_system(VarianceFlatnessConfig().resolved())
    for change in ({"optimizer": "momentum"}, {"hidden": (100, 100)}, {"layer": 1}, {"train_samples": 1000}):
        assert not is_reference_system(VarianceFlatnessConfig(**change).resolved())


@pytest.mark.parametrize("flags, message", [(["--layer", "4"], "layer (--layer) must be 1..3"),
                                            (["--optimizer", "adam", "--betas", "0.9,1.5"], "betas must be two")])
def test_bad_network_and_optimizer_settings_are_one_clear_error(tmp_path, capsys, flags, message):
    assert main(["reproduce", "variance-flatness", "--quick", "--out", str(tmp_path / "run"), "--no-progress",
                 *flags]) == 2
    assert message in capsys.readouterr().err


def test_missing_mnist_is_one_clear_error(tmp_path, capsys):
    code = main(["reproduce", "variance-flatness", "--dataset", "mnist", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "run"), "--quick", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and os.fspath(tmp_path) in err


def test_grid_quick_run_overlays_the_settings(tmp_path):
    out = tmp_path / "grid"
    args = ["reproduce", "variance-flatness", "--quick", "--out", str(out), "--no-progress", "--grid",
            "--grid-batch-sizes", "25,50", "--grid-lrs", "0.1"]
    assert main(args) == 0
    grid = json.loads((out / "grid.json").read_text())
    assert [(r["batch_size"], r["lr"]) for r in grid["settings"]] == [(25, 0.1), (50, 0.1)]
    assert grid["all_psi_positive"] and all(r["psi"] > 0 for r in grid["settings"])
    assert (out / "B25_lr0.1" / "report.md").exists() and (out / "B50_lr0.1" / "summary.json").exists()
    text = (out / "grid.md").read_text()
    assert "| 25 | 0.1 |" in text and "ψ > 0 for every setting: **yes**" in text
    (out / "B25_lr0.1" / "checkpoint.pt").unlink()  # a resumed grid reads finished settings, it does not rerun them
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "grid.json").read_text())["settings"] == grid["settings"]


def test_a_failed_grid_setting_is_recorded_and_the_others_kept(tmp_path, monkeypatch):
    from landscape_kernels.reproduce import variance_flatness as vf

    real_run = vf.run

    def run_failing_at_b25(cfg, out, **kwargs):
        if cfg.batch_size == 25:
            raise FloatingPointError("SGD turned unstable in epoch 0")
        return real_run(cfg, out, **kwargs)

    monkeypatch.setattr(vf, "run", run_failing_at_b25)
    out = tmp_path / "grid"
    grid = vf.run_grid(vf.VarianceFlatnessConfig(quick=True), str(out), batch_sizes=(25, 50), lrs=(0.1,),
                       progress=False, log=lambda *a: None)
    failed, kept = grid["settings"]
    assert failed["error"].startswith("FloatingPointError: SGD turned unstable") and "psi" not in failed
    assert kept["psi"] > 0 and kept["stopped_by"] == "max_epochs" and not grid["all_psi_positive"]
    text = (out / "grid.md").read_text()
    assert "| 25 | 0.1 | failed: FloatingPointError" in text and "ψ > 0 for every setting: **no**" in text


def test_an_unstable_run_is_rolled_back_reported_and_not_retrained_on_resume(tmp_path, monkeypatch):
    from landscape_kernels.reproduce import variance_flatness as vf
    from landscape_kernels.training.trainer import InstabilityGuard

    class FiresAfter30Epochs(InstabilityGuard):  # stands in for a burst: epochs 27-29 (0-based) are unstable
        def streak(self, history):
            return self.patience if len(history) == 30 else 0

    monkeypatch.setattr(vf, "InstabilityGuard", FiresAfter30Epochs)
    out = tmp_path / "run"
    lines = []
    summary = vf.run(vf.VarianceFlatnessConfig(quick=True), str(out), progress=False, log=lines.append)
    tr = summary["training"]
    assert tr["stopped_by"] == "unstable" and tr["epochs"] == 27
    assert [r["epoch"] for r in tr["instability"]] == [27, 28, 29]
    assert summary["psi"]["psi"] > 0  # the window that ended with epoch 26 is analysed
    assert any("rolled back to the end of epoch 26" in line for line in lines)
    assert "SGD turned unstable: in epochs 27–29" in (out / "report.md").read_text()
    again = vf.run(vf.VarianceFlatnessConfig(quick=True), str(out), resume=True, progress=False, log=lines.append)
    assert again["training"]["epochs"] == 27 and again["psi"] == summary["psi"]

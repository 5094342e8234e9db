"""`landscape-kernels reproduce forgetting` end to end (--quick), and its resumption."""
import json

from landscape_kernels.cli import main


def test_forgetting_quick_run(tmp_path):
    out = tmp_path / "fg"
    assert main(["reproduce", "forgetting", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in s["runs"]] == ["none", "ldc-quadratic", "ldc-hinge", "ewc"]
    assert len(s["lambda_sweep"]) == 3 * 2 and len(s["constraint_sweep"]) == 3 * 2
    assert all(len(r["curve"]) == 5 or r["diverged"] for r in s["runs"])
    assert "| method | λ | N_c | ε1 (task 1) | ε2 (task 2) |" in (out / "report.md").read_text()


def test_forgetting_resumes_with_task1_trained_and_finished_runs_reused(tmp_path, capsys):
    out = tmp_path / "fg"
    assert main(["reproduce", "forgetting", "--quick", "--out", str(out), "--no-progress"]) == 0
    first = json.loads((out / "summary.json").read_text())
    kept = json.loads((out / "runs.json").read_text())
    assert len(kept) == len({(r["method"], r["lam"], r["num_constraints"]) for part in ("runs", "lambda_sweep",
                                                                               "constraint_sweep") for r in first[part]})
    assert (out / "task1_checkpoint.pt").is_file()
    capsys.readouterr()
    assert main(["reproduce", "forgetting", "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and printed.count("done before, reusing it") == len(kept)
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"] == first["runs"] and again["task1"] == first["task1"]

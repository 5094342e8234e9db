"""`landscape-kernels reproduce dpsgd` end to end (--quick), simulated and under torchrun, and its checks."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from landscape_kernels.cli import main
from landscape_kernels.reproduce.dpsgd import checks
from testing import assert_report_and_resume


def test_dpsgd_quick_run_reports_every_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "dp"
    assert main(["reproduce", "dpsgd", "--quick", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "simulated learners" and len(s["runs"]) == 4
    for r in s["runs"]:
        assert r["total_batch"] == 4 * 32 and (out / "runs" / r["name"] / "result.json").is_file()
        assert r["records"][0]["step"] == 0 and len(r["records"][0]["eigenvalues"]) == 2
        if not r["diverged"]:
            assert [q["step"] for q in r["records"]] == [0, 20, 40]
            assert 0 <= r["records"][-1]["accuracy"] <= 1
    dp = [r for r in s["runs"] if r["algorithm"] == "dpsgd" and not r["diverged"]]
    assert all(q["spread"] > 0 and 0 <= q["alignment"] <= 1 for r in dp for q in r["records"][1:])
    _, again = assert_report_and_resume("dpsgd", out, ["DPSGD converges at (total batch, α) where SSGD does not"],
                                        ["fig_convergence_map.png", "fig_effective_lr.png"], capsys)
    assert again["runs"] == s["runs"]


def test_under_torchrun_two_ranks_run_what_two_simulated_learners_do(tmp_path):
    torchrun, command = shutil.which("torchrun"), shutil.which("landscape-kernels")
    if torchrun is None or command is None or sys.platform == "win32":
        pytest.skip("torchrun or landscape-kernels is not on PATH")
    args = ["reproduce", "dpsgd", "--no-progress", "--dataset", "digits", "--train-samples", "512", "--subset", "128",
            "--hidden", "16", "--batch-size", "32", "--lrs", "0.5,4", "--steps", "20", "--measure-every", "10",
            "--top-k", "2"]
    assert main([*args, "--learners", "2", "--out", str(tmp_path / "sim")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--no-python", command, *args, "--out",
                           str(tmp_path / "ranks")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report: ") == 1  # rank 0 alone writes
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())
    ranks = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    assert ranks["mode"] == "2 torchrun ranks" and ranks["config"]["learners"] == [2]
    for a, b in zip(sim["runs"], ranks["runs"]):
        assert (a["name"], a["converged"], a["diverged"]) == (b["name"], b["converged"], b["diverged"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-6)
        if a["final_lambda1"] is not None:
            assert b["final_lambda1"] == pytest.approx(a["final_lambda1"], rel=1e-3)


def test_bad_settings_are_one_clear_error(tmp_path, capsys):
    base = ["reproduce", "dpsgd", "--out", str(tmp_path / "d")]
    assert main(base + ["--learners", "1,4"]) == 2 and "learners must be at least 2" in capsys.readouterr().err
    assert main(base + ["--steps", "110", "--measure-every", "50"]) == 2 and "multiple of" in capsys.readouterr().err
    assert main(base + ["--dataset", "digits", "--train-samples", "100"]) == 2 and "one batch per learner" in capsys.readouterr().err


def _run(algorithm, n, lr, state, ratios=(), sharp=(), shares=(), lam=None):
    records = [{"step": 0, "eigenvalues": [sharp[0] if sharp else 1.0]}]
    for k, ratio in enumerate(ratios):
        records.append({"step": k + 1, "effective_lr_ratio": ratio, "eigenvalues": [sharp[k + 1] if sharp else 1.0],
                        "alignment": shares[k] * 1e-4 if shares else None, "isotropic": 1e-4})
    return {"algorithm": algorithm, "learners": n, "lr": lr, "total_batch": n * 10, "diverged": state == "diverged",
            "converged": state == "converged", "records": records, "final_lambda1": lam}


def test_checks_hold_and_fail_on_their_numbers():
    runs = [_run("ssgd", 4, 0.5, "converged", lam=5.0),
            _run("dpsgd", 4, 0.5, "converged", (0.9, 0.95), (2.0, 1.5, 1.0), (30, 40), lam=2.0),
            _run("ssgd", 4, 1.0, "diverged"),
            _run("dpsgd", 4, 1.0, "converged", (0.5, 0.8), (8.0, 4.0, 2.0), (50, 60), lam=1.5)]
    assert [c["holds"] for c in checks(runs)] == [True, True, True, True, True]
    runs[3] = _run("dpsgd", 4, 1.0, "diverged")  # no cell where only DPSGD converges
    runs[1] = _run("dpsgd", 4, 0.5, "converged", (0.8, 0.9, 1.2), (1.0, 2.0, 3.0, 4.0), (2, 3, 4), lam=6.0)
    assert [c["holds"] for c in checks(runs)] == [False, False, False, False, False]

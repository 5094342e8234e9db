"""`landscape-kernels reproduce forgetting` end to end (--quick), and its resumption."""
import json

from landscape_kernels.cli import main


def test_forgetting_quick_run(tmp_path):
    out = tmp_path / "fg"
    assert main(["reproduce", "forgetting", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in s["runs"]] == ["none", "ldc-quadratic", "ldc-hinge", "ewc", "ewc-top"]
    assert len(s["lambda_sweep"]) == 4 * 2 and len(s["constraint_sweep"]) == 3 * 2
    assert all(len(r["curve"]) == 5 and not r["diverged"] for r in s["runs"] + s["lambda_sweep"])  # proximal: stable
    assert s["task1"]["space"] == ["0.weight", "2.weight", "4.weight"] and s["task1"]["space_size"] == 64 * 50 + 2500 + 500
    assert [r["eps2"] for r in s["matched_eps2"]] == [0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    report = (out / "report.md").read_text()
    assert "| method | λ | N_c | ε1 (task 1) | ε2 (task 2) |" in report and "ε1 at matched ε2" in report


def test_separate_heads_keep_task_1_units_and_w2_space_with_explicit_steps(tmp_path):
    import torch

    from landscape_kernels.reproduce.forgetting import task_network
    from landscape_kernels.training.models import mlp

    model = mlp((6, 5, 4, 10), seed=0)
    head2 = task_network(model, "separate", 2)
    assert [n for n, _ in head2.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randn(7, 6)
    assert torch.equal(head2(x), model(x)[:, 2:4]) and task_network(model, "shared", 2) is model
    torch.nn.functional.cross_entropy(head2(x), torch.randint(0, 2, (7,))).backward()
    assert bool((model[4].weight.grad[[0, 1, 4, 5, 6, 7, 8, 9]] == 0).all())  # task 2 never moves task 1's units

    out = tmp_path / "fg"
    assert main(["reproduce", "forgetting", "--quick", "--out", str(out), "--no-progress", "--head", "separate",
                 "--space", "w2", "--integrator", "explicit", "--lam", "1e6"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["task1"]["space"] == ["2.weight"] and s["task1"]["space_size"] == 2500
    stiff = {r["method"]: r for r in s["runs"]}
    assert stiff["ldc-quadratic"]["diverged"] and not stiff["none"]["diverged"]  # an explicit step on lambda 1e6
    assert "diverges or oscillates once" in (out / "report.md").read_text()


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


def test_matched_comparison_calls_differences_within_the_test_noise_a_tie():
    from landscape_kernels.reproduce.forgetting import compare_at_matched_eps2

    sweep = [{"method": m, "eps2": e2, "eps1": e1} for m, pts in
             {"ldc-quadratic": [(0.0, 0.10), (0.1, 0.02)], "ldc-hinge": [(0.0, 0.3), (0.1, 0.3)],
              "ewc": [(0.0, 0.30), (0.1, 0.11)], "ewc-top": [(0.0, 0.5)]}.items() for e2, e1 in pts]
    rows = {r["eps2"]: r for r in compare_at_matched_eps2(sweep, 2000, levels=(0.0, 0.1, 0.2))}
    assert rows[0.0]["best_ldc"] == 0.10 and rows[0.0]["best_ewc"] == 0.30 and rows[0.0]["ldc_beats_ewc"] == "yes"
    assert rows[0.1]["ldc_beats_ewc"] == "yes" and rows[0.2]["ldc_beats_ewc"] is None
    close = [{"method": m, "eps2": 0.0, "eps1": e1} for m, e1 in (("ldc-quadratic", 0.200), ("ewc", 0.215))]
    assert compare_at_matched_eps2(close, 2000, levels=(0.0,))[0]["ldc_beats_ewc"] == "tie"

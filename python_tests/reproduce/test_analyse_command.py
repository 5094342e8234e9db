"""``landscape-kernels analyse`` as a user runs it: each preset end to end with --quick, a user-written
MODULE:FUNCTION, a single checkpoint and a series, --resume, and clear errors for bad input."""
import json
import os
import textwrap

import pytest
import torch

from landscape_kernels.cli import main
from landscape_kernels.training.presets import PRESETS

FIGURES = {"density.png", "gradient_norms.png", "profiles.png", "surface.png", "noise_curvature.png", "layers.png"}

USER_MODULE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F

    def build():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(90, 6, generator=g), torch.randint(0, 3, (90,), generator=g)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        return model, F.cross_entropy, [(x[i:i + 30], y[i:i + 30]) for i in range(0, 90, 30)]

    def as_dict():
        model, loss_fn, data = build()
        return {"model": model, "loss_fn": loss_fn, "data": data}

    def fails():
        raise RuntimeError("no GPU here")

    def wrong():
        return 3

    def empty():
        model, loss_fn, _ = build()
        return model, loss_fn, [(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))]
''')


@pytest.fixture
def user_module(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(USER_MODULE)
    return str(path)


def run(args, out):
    code = main(["analyse", *args, "--out", str(out), "--no-progress"])
    return code, (json.load(open(out / "summary.json")) if code == 0 else None)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_end_to_end(preset, tmp_path):
    if preset == "gpt2-tiny":
        pytest.importorskip("transformers")
    code, s = run(["--preset", preset, "--quick"], tmp_path)
    assert code == 0
    report = open(tmp_path / "report.md").read()
    assert "Hessian λ_1" in report and "B_simple" in report and "γ in C_ii" in report
    assert FIGURES <= set(os.listdir(tmp_path))
    assert set(s["timings_s"]) >= {"hessian", "ggn", "density", "trace", "layers", "noise", "overlap", "profiles",
                                   "surface", "report"}
    h = s["stages"]["hessian"]
    assert h["eigenvalues"] == sorted(h["eigenvalues"], reverse=True) and h["eigenvalues"][0] > 0
    assert s["stages"]["noise"]["b_simple"] > 0


def test_kfac_stage_in_the_report(tmp_path):
    code, s = run(["--preset", "digits-mlp", "--quick", "--what", "kfac"], tmp_path)
    assert code == 0 and set(s["stages"]) == {"kfac"}
    k = s["stages"]["kfac"]
    assert len(k["kfac"]["top"]) == len(k["hessian_top"]) and k["ekfac"]["trace"] > 0
    report = open(tmp_path / "report.md").read()
    assert "KFAC λ_1 … λ_k / exact" in report and "EKFAC λ_1 … λ_k / exact" in report


def test_user_function_from_a_file_and_from_a_module(user_module, tmp_path, monkeypatch, capsys):
    code, s = run(["--model", f"{user_module}:build", "--quick", "--what", "hessian,noise"], tmp_path / "a")
    assert code == 0 and set(s["stages"]) == {"hessian", "noise"} and s["num_samples"] == 90
    monkeypatch.chdir(os.path.dirname(user_module))
    code, t = run(["--model", "my_models:as_dict", "--quick", "--what", "hessian,noise", "--samples", "45"], tmp_path / "b")
    assert code == 0 and t["num_samples"] == 45
    code, u = run(["--model", "my_models:build", "--quick", "--what", "hessian", "--dtype", "float64"], tmp_path / "c")
    assert code == 0 and u["stages"]["hessian"]["eigenvalues"][0] == pytest.approx(s["stages"]["hessian"]["eigenvalues"][0],
                                                                                   rel=1e-3)


def _checkpoints(user_module, folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location("my_models_for_ckpt", user_module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, loss_fn, data = mod.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    os.makedirs(folder)
    losses = []
    for step in range(12):
        if step in (0, 2, 10):
            name = f"step_{step}.safetensors" if step == 2 else f"step_{step}.pt"
            if name.endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file(model.state_dict(), str(folder / name))
            else:
                torch.save({"model": model.state_dict(), "step": step}, folder / name)
            with torch.no_grad():
                losses.append(sum(float(loss_fn(model(x), y)) * len(y) for x, y in data) / 90)
        opt.zero_grad()
        sum(loss_fn(model(x), y) for x, y in data).backward()
        opt.step()
    return losses


def test_checkpoint_series_gives_curves_in_step_order(user_module, tmp_path):
    pytest.importorskip("safetensors")
    losses = _checkpoints(user_module, tmp_path / "ckpts")
    code, s = run(["--model", f"{user_module}:build", "--checkpoints", str(tmp_path / "ckpts"), "--quick",
                   "--what", "hessian,trace,noise"], tmp_path / "out")
    assert code == 0
    assert [r["checkpoint"] for r in s["series"]] == ["step_0", "step_2", "step_10"]  # natural order
    assert [r["loss"] for r in s["series"]] == pytest.approx(losses, rel=1e-5)
    assert "training_curves.png" in os.listdir(tmp_path / "out")
    assert "## Along training" in open(tmp_path / "out" / "report.md").read()
    code, one = run(["--model", f"{user_module}:build", "--checkpoint", str(tmp_path / "ckpts" / "step_10.pt"),
                     "--quick", "--what", "hessian"], tmp_path / "single")
    assert code == 0 and one["loss"] == pytest.approx(losses[-1], rel=1e-5)


def test_resume_reuses_finished_stages(user_module, tmp_path, capsys):
    args = ["--model", f"{user_module}:build", "--quick", "--what", "hessian,trace"]
    assert run(args, tmp_path)[0] == 0
    capsys.readouterr()
    code, s = run(args + ["--resume"], tmp_path)
    assert code == 0 and "hessian: done before" in capsys.readouterr().out
    assert s["timings_s"]["hessian"] == 0.0
    assert main(["analyse", *args[:-1], "hessian", "--top-k", "3", "--resume", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --preset"),
    (["--preset", "cnn", "--model", "x:y"], "give exactly one of --preset"),
    (["--model", "no_such_module_here:build"], "importing 'no_such_module_here' failed"),
    (["--model", "nocolon"], "expected MODULE:FUNCTION"),
    (["--model", "{file}:missing"], "has no function 'missing'"),
    (["--model", "{file}:fails"], "the model function failed: RuntimeError: no GPU here"),
    (["--model", "{file}:wrong"], "must return (model, loss_fn, data)"),
    (["--model", "{file}:empty"], "no samples"),
    (["--model", "{file}:build", "--what", "spectrum"], "--what 'spectrum'"),
    (["--model", "{file}:build", "--samples", "0"], "samples (--samples) must be finite and positive"),
    (["--model", "{file}:build", "--checkpoint", "{missing}"], "no such file"),
    (["--model", "{file}:build", "--checkpoint", "{corrupt}"], "not a readable state file"),
    (["--model", "{file}:build", "--checkpoint", "{mismatch}"], "does not match the model: wrong shapes"),
    (["--model", "{file}:build", "--checkpoint", "{foreign}"], "expected a state_dict"),
    (["--model", "{file}:build", "--checkpoints", "{empty_dir}"], "no checkpoint files"),
    (["--model", "{file}:build", "--device", "cuda:7"], "device (--device)"),
])
def test_bad_input_is_one_clear_line(args, message, user_module, tmp_path, capsys):
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    torch.save({"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(8), "2.weight": torch.zeros(3, 8),
                "2.bias": torch.zeros(3)}, tmp_path / "mismatch.pt")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "foreign.pt")
    os.makedirs(tmp_path / "empty_dir")
    paths = {"file": user_module, "missing": str(tmp_path / "none.pt"), "corrupt": str(tmp_path / "corrupt.pt"),
             "mismatch": str(tmp_path / "mismatch.pt"), "foreign": str(tmp_path / "foreign.pt"),
             "empty_dir": str(tmp_path / "empty_dir")}
    args = [a.format(**paths) for a in args]
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert main(["analyse", *args, "--quick", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_under_torchrun_two_processes_report_what_one_does(user_module, tmp_path):
    """``torchrun --nproc_per_node 2 landscape-kernels analyse ...``: each rank takes half the samples
    (here a batch is cut between them), the numbers are one process's, and rank 0 alone writes."""
    import shutil
    import subprocess
    import sys

    torchrun, command = shutil.which("torchrun"), shutil.which("landscape-kernels")
    if torchrun is None or command is None or sys.platform == "win32":
        pytest.skip("torchrun or landscape-kernels is not on PATH")
    args = ["--model", f"{user_module}:build", "--quick", "--what", "hessian,noise,profiles", "--dtype", "float64"]
    code, one = run(args, tmp_path / "one")
    assert code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--no-python", command, "analyse", *args,
                           "--out", str(tmp_path / "two"), "--no-progress"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report: ") == 1  # rank 0's line only
    two = json.load(open(tmp_path / "two" / "summary.json"))
    assert (one["ranks"], two["ranks"]) == (1, 2) and two["num_samples"] == one["num_samples"] == 90
    assert "shared by 2 torchrun processes" in open(tmp_path / "two" / "report.md").read()
    a, b = one["stages"], two["stages"]
    assert b["hessian"]["eigenvalues"] == pytest.approx(a["hessian"]["eigenvalues"], rel=1e-8)
    for key in ("b_simple", "b_simple_stderr", "noise_trace", "gradient_sq_norm", "norm_mean"):
        assert b["noise"][key] == pytest.approx(a["noise"][key], rel=1e-8), key
    assert b["noise"]["norm_quantiles"] == pytest.approx(a["noise"]["norm_quantiles"], rel=1e-8)
    assert b["noise"]["spectrum"]["eigenvalues"] == pytest.approx(a["noise"]["spectrum"]["eigenvalues"], rel=1e-8)
    assert b["profiles"]["eigen_curvature"] == pytest.approx(a["profiles"]["eigen_curvature"], rel=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-12)

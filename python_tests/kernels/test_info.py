"""Backends, info() and the CLI; the package must work with the extension missing."""
import json
import os
import subprocess
import sys

import torch

import landscape_kernels as lk


def run_python(code, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_info_reports_backends():
    d = lk.info()
    assert d["torch"] == torch.__version__ and d["threads"] == torch.get_num_threads()
    assert d["backends"]["cpu"] in ("compiled", "reference")
    if lk.ops.EXTENSION_ERROR is None:
        assert "cpu" in d["compiled_kernels"] and d["backends"]["cpu"] == "compiled"
    if not torch.cuda.is_available():
        assert d["backends"]["cuda"] == "no CUDA device" and d["cuda_device"] is None


def test_cli_info_json_and_backend_override():
    out = subprocess.run([sys.executable, "-m", "landscape_kernels.cli", "info", "--json"], capture_output=True,
                         text=True, env={**os.environ, "LANDSCAPE_KERNELS_BACKEND": "reference"})
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["backend_setting"] == "reference" and d["backends"]["cpu"] == "reference"
    text = subprocess.run([sys.executable, "-m", "landscape_kernels.cli", "info"], capture_output=True, text=True)
    assert "extension:" in text.stdout and "cpu   ->" in text.stdout


def test_package_works_without_the_extension():
    code = """
import sys, json, torch
sys.modules['landscape_kernels.kernels._C'] = None  # as if the build failed or was skipped
import landscape_kernels as lk
A, D, V = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 2, dtype=torch.float64), torch.randn(2, 2, 4, dtype=torch.float64)
raw = torch.ops.landscape_kernels.per_sample_gram(A, D)
assert torch.allclose(raw, lk.reference.per_sample_gram(A, D))
torch.library.opcheck(torch.ops.landscape_kernels.per_sample_cov_matvec.default, (A, D, V))
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
with lk.PerSampleGradients(model) as ps:
    torch.nn.functional.cross_entropy(model(torch.randn(6, 4)), torch.tensor([0, 1, 0, 1, 1, 0])).backward()
assert ps.sq_norms().shape == (6,)
print(json.dumps(lk.info()))
"""
    d = json.loads(run_python(code).strip().splitlines()[-1])
    assert d["extension"].startswith("not loaded") and d["compiled_kernels"] == []
    assert d["backends"]["cpu"] == "reference"


def test_compiled_backend_request_without_kernels_is_an_error():
    code = """
import sys
sys.modules['landscape_kernels.kernels._C'] = None
import torch, landscape_kernels as lk
try:
    lk.ops.per_sample_sq_norms(torch.randn(2, 3), torch.randn(2, 1))
except RuntimeError as e:
    print('ERR', e)
"""
    out = run_python(code, LANDSCAPE_KERNELS_BACKEND="compiled")
    assert "ERR LANDSCAPE_KERNELS_BACKEND=compiled but there are no compiled kernels for cpu" in out

"""Shared test conventions for the whole project: devices, dtypes, backends, tolerances, inputs.

- DEVICES: 'cpu', plus 'cuda' when a GPU is visible (CUDA cases are skipped otherwise, never faked).
- BACKENDS: 'compiled' where the extension has kernels for the device, and always 'reference'.
- Tolerances (DESIGN §3): relative error ||out - ref|| / ||ref|| against a float64 oracle.
"""
import pytest
import torch

from landscape_kernels import ops

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


def backends_for(device):
    return (["compiled"] if device in ops.compiled_devices() else []) + ["reference"]


DEVICE_BACKENDS = [
    pytest.param(d, b, id=f"{d}-{b}", marks=() if d == "cpu" else pytest.mark.skipif(not CUDA, reason="no CUDA device"))
    for d in ("cpu", "cuda")
    for b in (backends_for(d) if (d == "cpu" or CUDA) else ["compiled"])
]


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def assert_close(out, ref, dtype, factor=1.0, what=""):
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = rel_err(out, ref)
    assert err <= TOL[dtype] * factor, f"{what}: relative error {err:.3e} > {TOL[dtype] * factor:.1e}"


def randn(*shape, dtype, device, generator, contiguous=True):
    """Fresh random tensor; non-contiguous ones are views with a transposed / strided layout."""
    if contiguous:
        return torch.randn(*shape, dtype=dtype, generator=generator).to(device)
    big = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, generator=generator).to(device)
    x = big[..., ::2]
    assert not x.is_contiguous() or x.numel() <= 1
    return x

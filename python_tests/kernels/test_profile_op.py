"""The loss-profile op profile_ce_losses against its float64 reference and against an explicit
network; opcheck; bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from landscape_kernels import ops, reference
from testing import DEVICE_BACKENDS, DEVICES, DTYPES, TOL, assert_close, randn, rel_err

# (R, H, U, M, C): one row; odd sizes around the kernel's 16-row blocks; a wide hidden layer; many classes
SIZES = [(1, 1, 1, 1, 2), (17, 13, 3, 7, 5), (33, 50, 2, 41, 10), (300, 130, 4, 9, 37), (16, 8, 1, 64, 3)]


def inputs(R, H, U, M, C, dtype, device, gen, contiguous=True, bias=True):
    z0 = randn(R, H, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    zd = randn(U, R, H, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    direction = torch.randint(0, U, (M,), generator=gen).to(device)
    offset = (3 * torch.randn(M, dtype=dtype, generator=gen)).to(device)
    weight = randn(C, H, dtype=dtype, device=device, generator=gen, contiguous=contiguous)
    b = torch.randn(C, dtype=dtype, generator=gen).to(device) if bias else None
    target = torch.randint(0, C, (R,), generator=gen).to(device)
    return z0, zd, direction, offset, weight, b, target


def torch_losses(z0, zd, direction, offset, weight, bias, target):
    """The same losses by PyTorch in the inputs' own dtype: the accuracy a user gets without the op."""
    return torch.stack([F.cross_entropy(F.linear(torch.relu(z0 + offset[m] * zd[direction[m]]), weight, bias), target,
                                        reduction="sum") for m in range(direction.shape[0])])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_matches_reference(sizes, bias, contiguous, dtype, device, backend, gen):
    args = inputs(*sizes, dtype, device, gen, contiguous, bias)
    with ops.use_backend(backend):
        out = ops.profile_ce_losses(*args)
    assert out.dtype == torch.float64 and out.shape == (sizes[3],) and out.device.type == device
    ref = reference.profile_ce_losses(*[a.double().cpu() if a is not None and a.is_floating_point()
                                        else (a.cpu() if a is not None else None) for a in args])
    # a loss near 0 (a confidently right row) loses digits to the rounding of its float32 logits in any
    # float32 evaluation: the op may then be at most 2x worse than PyTorch's own in the same dtype
    torch_error = rel_err(torch_losses(*args), ref)
    assert_close(out, ref, dtype, factor=max(1.0, 2 * torch_error / TOL[dtype]), what="profile_ce_losses")


def test_reference_is_the_network_loss(gen):
    """Summed cross-entropy of Linear(relu(layer output moved along a direction)) for every point."""
    z0, zd, direction, offset, weight, b, target = inputs(20, 6, 2, 5, 4, torch.float64, "cpu", gen)
    want = torch.stack([F.cross_entropy(F.linear(torch.relu(z0 + offset[m] * zd[direction[m]]), weight, b), target,
                                        reduction="sum") for m in range(5)])
    assert torch.allclose(reference.profile_ce_losses(z0, zd, direction, offset, weight, b, target), want, rtol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_do_not_overflow(device, gen):
    z0, zd, direction, offset, weight, b, target = inputs(40, 10, 2, 6, 5, torch.float32, device, gen)
    out = ops.profile_ce_losses(z0 * 1e3, zd, direction, offset, weight, b, target)
    ref = reference.profile_ce_losses(z0.cpu() * 1e3, zd.cpu(), direction.cpu(), offset.cpu(), weight.cpu(), b.cpu(),
                                      target.cpu())
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, what="logits of order 1e4")


def fsum_losses(z0, zd, direction, offset, weight, target):
    """The summed losses from float64 logits, each row as log1p(sum_{c != target} exp(z_c - z_target)) with
    math.fsum: an oracle independent of the reference, exact for rows whose target is the largest logit."""
    out = []
    for m in range(direction.shape[0]):
        logits = (torch.relu(z0 + offset[m] * zd[direction[m]]) @ weight.T).tolist()
        out.append(math.fsum(math.log1p(math.fsum(math.exp(z - row[t]) for c, z in enumerate(row) if c != t))
                             for row, t in zip(logits, target.tolist())))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin", [8.0, 25.0, 45.0, 95.0])
def test_confidently_right_rows_keep_their_small_loss(margin, dtype, device, backend, gen):
    # every row right by about `margin` logits: a loss of ~exp(-margin) per row, far below one rounding
    # of the log-sum-exp (which alone rounds log(1 + 1e-11) to 0 in float32, log(1 + 1e-17) in float64)
    R, C = 24, 4
    target = torch.arange(R) % C
    z0 = 0.01 * torch.rand(R, C, dtype=torch.float64, generator=gen)
    z0[torch.arange(R), target] += 1.0  # positive: relu leaves it alone
    weight = margin * torch.eye(C, dtype=torch.float64) + 0.1 * torch.randn(C, C, dtype=torch.float64, generator=gen)
    zd = torch.randn(1, R, C, dtype=torch.float64, generator=gen)
    direction, offset = torch.tensor([0, 0]), torch.tensor([0.0, 1e-3], dtype=torch.float64)
    z0, zd, offset, weight = (t.to(dtype) for t in (z0, zd, offset, weight))
    want = fsum_losses(z0.double(), zd.double(), direction, offset.double(), weight.double(), target)
    assert float(want.max()) < R * math.exp(-0.8 * margin)  # the losses really are that small
    with ops.use_backend(backend):
        out = ops.profile_ce_losses(*[t.to(device) for t in (z0, zd, direction, offset, weight)], None, target.to(device))
    # float32 logits carry ~6e-8 * margin of absolute error, i.e. that relative error in exp(-margin)
    tol = 1e-12 if dtype == torch.float64 else 20 * margin * 6e-8
    assert rel_err(out, want) <= tol, (out, want)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    args = inputs(19, 7, 2, 5, 3, torch.float32, device, gen)
    torch.library.opcheck(torch.ops.landscape_kernels.profile_ce_losses.default, args)
    torch.library.opcheck(torch.ops.landscape_kernels.profile_ce_losses.default, args[:5] + (None,) + args[6:])


def test_bad_input_is_named(gen):
    z0, zd, direction, offset, weight, b, target = inputs(9, 4, 2, 3, 5, torch.float32, "cpu", gen)
    cases = [
        ((z0[0], zd, direction, offset, weight, b, target), ValueError, "z0 must have shape \\(R, H\\)"),
        ((z0, zd[:, :3], direction, offset, weight, b, target), ValueError, "zd must have shape \\(U, R, H\\)"),
        ((z0, zd, direction + 2, offset, weight, b, target), ValueError, "direction values must lie in \\[0, U\\)"),
        ((z0, zd, direction, offset[:2], weight, b, target), ValueError, "offset must have shape \\(M,\\)"),
        ((z0, zd, direction, offset, weight[:, :3], b, target), ValueError, "weight must have shape \\(C, H\\)"),
        ((z0, zd, direction, offset, weight, b[:2], target), ValueError, "bias must have shape \\(C,\\)"),
        ((z0, zd, direction, offset, weight, b, target + 5), ValueError, "target values must be classes"),
        ((z0, zd.double(), direction, offset, weight, b, target), TypeError, "zd must have z0's dtype"),
        ((z0, zd, direction.int(), offset, weight, b, target), ValueError, "direction must be a 1-D int64"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            ops.profile_ce_losses(*args)
    bad = z0.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="z0"):
        ops.profile_ce_losses(bad, zd, direction, offset, weight, b, target)
    with pytest.raises(ValueError, match="target"):  # the raw op checks ranges too
        torch.ops.landscape_kernels.profile_ce_losses(z0, zd, direction, offset, weight, b, torch.full_like(target, 9))

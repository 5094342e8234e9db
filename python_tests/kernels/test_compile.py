"""Every op of torch.ops.landscape_kernels under torch.compile(fullgraph=True, dynamic=True) and
torch.export with dynamic sizes: the same results as eager on two sets of sizes (the fake kernels hold no
data-dependent guard and do not specialise), and the validated wrappers compile too, with their finite
checks kept as in-graph assertions."""
import pytest
import torch
from torch.export import Dim

from landscape_kernels import ops
from landscape_kernels.kernels.ops import SCHEMAS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def arguments(name, B, T, n_in, n_out, K=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(B * 100 + T)

    def r(*shape):
        return torch.randn(*shape, dtype=dtype, generator=g)

    A, D = r(B, T, n_in), r(B, T, n_out)
    if name in ("per_sample_sq_norms", "per_sample_gram", "per_sample_moments", "per_sample_stats"):
        return (A, D)
    if name == "per_sample_stats_about":
        return (A, D, r(n_out, n_in))
    if name in ("per_sample_project", "per_sample_cov_matvec"):
        return (A, D, r(K, n_out, n_in))
    if name == "per_sample_weighted_sum":
        return (A, D, r(B, K))
    if name == "lanczos_reorth":
        Q = torch.linalg.qr(r(2, n_in + 8, 5).transpose(1, 2).transpose(1, 2))[0].transpose(1, 2).contiguous()
        return (Q, r(2, 2, n_in + 8), 3)
    if name == "trajectory_cov_update":
        M = r(n_in, n_in)
        return (M @ M.T, r(n_in), 4, r(B, n_in).float())
    if name == "trajectory_project":
        return (r(B, n_in).float(), r(n_in), r(K, n_in))
    if name == "profile_ce_losses":
        C = n_out + 1
        return (r(B, T + 1).float(), r(K, B, T + 1).float(), torch.randint(0, K, (5,), generator=g),
                r(5).float(), r(C, T + 1).float(), r(C).float(), torch.randint(0, C, (B,), generator=g))
    raise AssertionError(f"no arguments for {name}: add them here")


SIZES = [(5, 3, 4, 2), (7, 4, 6, 3)]


def clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def results(out, args):
    """The outputs, and for the op that updates its arguments in place, the updated arguments."""
    if out is None:
        return [a for a in args if isinstance(a, torch.Tensor)][:2]
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_op_compiles_fullgraph_with_dynamic_shapes(name):
    op = getattr(torch.ops.landscape_kernels, name)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, dynamic=True)
    for sizes in SIZES:
        args = arguments(name, *sizes)
        eager_args, compiled_args = clone(args), clone(args)
        want = results(op(*eager_args), eager_args)
        got = results(compiled(*compiled_args), compiled_args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in SCHEMAS if n != "trajectory_cov_update"])
def test_every_functional_op_exports_with_dynamic_sizes(name):
    op = getattr(torch.ops.landscape_kernels, name)
    args = arguments(name, *SIZES[0])
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    class Call(torch.nn.Module):
        def forward(self, *tensor_args):
            full = list(args)
            for i, t in zip(tensors, tensor_args):
                full[i] = t
            return op(*full)

    dynamic = tuple({d: Dim.AUTO for d in range(args[i].dim())} for i in tensors)
    exported = torch.export.export(Call(), tuple(args[i] for i in tensors), dynamic_shapes=(dynamic,))
    for sizes in SIZES:
        other = arguments(name, *sizes)
        got, want = exported.module()(*(other[i] for i in tensors)), op(*other)
        for g, w in zip(results(got, other), results(want, other)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_validated_wrappers_compile_and_keep_their_finite_check():
    torch._dynamo.reset()
    gram = torch.compile(lambda a, d: ops.per_sample_gram(a, d), fullgraph=True, dynamic=True)
    A, D = arguments("per_sample_gram", *SIZES[0])
    torch.testing.assert_close(gram(A, D), ops.per_sample_gram(A, D))
    A[0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="A contains NaN/Inf"):
        gram(A, D)

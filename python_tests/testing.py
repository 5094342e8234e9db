"""Shared test conventions and oracles for the whole project (the tests mirror the package: one folder
per subpackage; what more than one test file needs lives here).

- DEVICES: 'cpu', plus 'cuda' when a GPU is visible (CUDA cases are skipped otherwise, never faked).
- BACKENDS: 'compiled' where the extension has kernels for the device, and always 'reference'.
- Tolerances (docs/architecture.md): relative error ||out - ref|| / ||ref|| against a float64 oracle.
- Models: ``small_mlp`` builds the seeded fully connected networks most tests use.
- Oracles: dense Hessians and GGNs by ``torch.autograd.functional``, per-sample gradients by
  ``torch.func.vmap(grad)``, on a float64 copy of the model in eval mode (the model itself is untouched).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

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
    """||out - ref|| / ||ref|| in float64 on the CPU (the absolute error when ref is zero)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def assert_close(out, ref, dtype, factor=1.0, what=""):
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = rel_err(out, ref)
    assert err <= TOL[dtype] * factor, f"{what}: relative error {err:.3e} > {TOL[dtype] * factor:.1e}"


def batch_mean_centre(A, D):
    """The batch mean of G_b = sum_t D[b,t]^T A[b,t] in A's dtype, as autograd's gradient would give it:
    the centre of per_sample_stats_about."""
    A3, D3 = (t.unsqueeze(1) if t.dim() == 2 else t for t in (A, D))
    return torch.einsum("bto,bti->oi", D3, A3).div(A.shape[0]).contiguous()


def per_sample_op_args(name, A, D, V, W):
    """The arguments of the per-sample op ``name`` out of a layer's (A, D), directions V and weights W."""
    if name in ("per_sample_project", "per_sample_cov_matvec"):
        return A, D, V
    if name == "per_sample_stats_about":
        return A, D, batch_mean_centre(A, D)
    return (A, D, W) if name == "per_sample_weighted_sum" else (A, D)


def zero_variance_floor(mean, dtype):
    """What the variance of identical samples may be instead of 0: TOL[dtype] of one rounding of the mean,
    squared (a variance centred on the rounded mean without correction is off by about that rounding squared)."""
    return TOL[dtype] * (torch.finfo(dtype).eps * mean.double()) ** 2


def randn(*shape, dtype, device, generator, contiguous=True):
    """Fresh random tensor; non-contiguous ones are views with a transposed / strided layout."""
    if contiguous:
        return torch.randn(*shape, dtype=dtype, generator=generator).to(device)
    big = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, generator=generator).to(device)
    x = big[..., ::2]
    assert not x.is_contiguous() or x.numel() <= 1
    return x


def seed_from(gen):
    """Seed the global RNG (module initialisation) from the test's generator: fresh but reproducible."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))


def small_mlp(widths, activation=nn.ReLU, bias=True, seed=None, dtype=torch.float64):
    """``nn.Sequential`` of Linear layers of the given widths with ``activation`` between them; ``bias`` is
    one bool or one per layer; the initialisation from ``torch.manual_seed(seed)`` (None: the global RNG
    as it stands), in ``dtype``."""
    if seed is not None:
        torch.manual_seed(seed)
    biases = [bias] * (len(widths) - 1) if isinstance(bias, bool) else list(bias)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(n_in, n_out, bias=biases[i]))
    return nn.Sequential(*layers).to(dtype)


# ----------------------------------------------------------------------------------- oracles
def _float64_copy(model):
    return copy.deepcopy(model).double().eval()


def flat_parameter_function(model, names, x, of_outputs):
    """(f, theta0): f(theta) = of_outputs(model(x)) with the parameters ``names`` set from the flat
    vector theta (in the order given), on a float64 copy of the model in eval mode. ``x``: a tensor, a
    tuple or a dict of inputs; a transformers output gives its logits."""
    from landscape_kernels.capture.model import call_model, cast_floating, model_output

    model = _float64_copy(model)
    params = dict(model.named_parameters())
    names = list(params) if names is None else list(names)
    shapes, sizes = [params[n].shape for n in names], [params[n].numel() for n in names]
    x = cast_floating(x, torch.float64)

    def f(theta):
        values = {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return of_outputs(model_output(call_model(model, x, values)))

    return f, torch.cat([params[n].detach().flatten() for n in names])


def dense_hessian(model, loss_fn, x, y, names=None):
    """(P, P) Hessian of ``loss_fn(model(x), y)`` in the parameters ``names`` (None: all), float64."""
    f, theta0 = flat_parameter_function(model, names, x, lambda out: loss_fn(out, y))
    return torch.autograd.functional.hessian(f, theta0)


def dense_cross_entropy_ggn(model, x, y, names=None):
    """(P, P) generalised Gauss-Newton J^T H_out J of the mean cross-entropy, float64."""
    f, theta0 = flat_parameter_function(model, names, x, lambda out: out)
    J = torch.autograd.functional.jacobian(f, theta0)  # (N, C, P)
    s = f(theta0).detach().softmax(1)
    H_out = (torch.diag_embed(s) - s[:, :, None] * s[:, None, :]) / x.shape[0]
    return torch.einsum("ncp,ncd,ndq->pq", J, H_out, J)


def vmap_per_sample_gradients(model, x, y, names=None, loss_fn=F.cross_entropy):
    """(B, P) gradients of the per-sample losses ``loss_fn(model(x_b), y_b)``, parameters in ``names``
    order (None: all), by ``torch.func.vmap(grad)`` in the model's own dtype."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else list(names)

    def loss(p, xb, yb):
        return loss_fn(functional_call(model, p, (xb[None],)), yb[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], 1)


def loop_per_sample_gradients(model, loss_fn, inputs, targets, names=None, output_fn=None):
    """(B, P) gradients of the per-sample losses by B ordinary backward passes, each sample a batch of
    one (inputs: a tensor, tuple or dict; the model's own call): the oracle independent of torch.func."""
    from landscape_kernels.capture.model import batch_size_of, call_model, model_output, slice_batch

    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad] if names is None else list(names)
    rows = []
    for b in range(batch_size_of(inputs)):
        out = model_output(call_model(model, slice_batch(inputs, b, b + 1)), output_fn)
        g = torch.autograd.grad(loss_fn(out, targets[b : b + 1]), [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([torch.zeros(params[n].numel(), dtype=params[n].dtype) if gi is None else gi.reshape(-1)
                               for n, gi in zip(names, g)]))
    return torch.stack(rows)



def assert_report_and_resume(job, out, phrases, figures, capsys):
    """A finished ``reproduce JOB --quick`` run in ``out``: report.md holds ``phrases`` and links every
    figure in ``figures`` (each written); a ``--resume`` reuses the parts and leaves the summary's
    results as they were. Returns (summary before, summary after)."""
    import json

    from landscape_kernels.cli import main

    before = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    for phrase in phrases:
        assert phrase in report, phrase
    for fig in figures:
        assert fig in report and (out / fig).is_file(), fig
    capsys.readouterr()
    assert main(["reproduce", job, "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    assert "done before" in capsys.readouterr().out
    return before, json.loads((out / "summary.json").read_text())

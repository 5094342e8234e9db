"""Exact diagonals of the curvature and noise matrices of a model's mean training loss, shaped like the
parameters (a dict name -> tensor), without forming any P x P matrix.

- ``fisher_diagonal``: the empirical Fisher (1/N) sum_n g_n^2, and ``noise_diagonal``: the per-sample
  gradient covariance (1/N) sum_n (g_n - g)^2 (divided by an SGD batch size on request), both from the
  fused per-sample moments of one forward and backward per batch;
- ``ggn_diagonal``: the generalised Gauss-Newton diagonal of the mean cross-entropy or squared error,
  sum over the columns s_k of the output-Hessian square root of the per-sample (J^T s_k)^2, each column
  one forward and backward with per-sample capture (so every layer the capture supports, per layer).

Data, parameters and output conventions are those of the operators (``ModelOperator``); estimators
of the diagonal of any operator (Hutchinson, XDiag) are in ``linalg.diagonal``.
"""
import torch

from ..capture.model import as_batches, batch_size_of, call_model, chosen_parameters, eval_mode, model_output
from ..capture.persample import PerSampleGradients
from .loss_hessian import check_loss, exact_columns
from .noise import sgd_noise_scale


def _squares_and_sums(model, params, loss_fn, x, y, output_fn, loss_reduction):
    """{name: (sum_n g_n^2, sum_n g_n)} over one batch, from the fused per-sample moments."""
    ps = PerSampleGradients(model, params=params, loss_reduction=loss_reduction, output_fn=output_fn)
    ps.compute(loss_fn, x, y)
    B = ps.batch_size
    mean, var = ps.mean(), ps.variance()
    return {n: ((var[n] + mean[n] ** 2) * B, mean[n] * B) for n in mean}


def _setup(model, data, params, batch_size):
    batches = as_batches(data, batch_size)
    names, tensors = chosen_parameters(model, params)
    N = sum(batch_size_of(b[0]) for b in batches)
    return batches, names, tensors, N


def _gradient_moments(model, loss_fn, data, params, batch_size, output_fn):
    """(names, {name: (1/N) sum g_n^2}, {name: (1/N) sum g_n}, N) over the data."""
    batches, names, tensors, N = _setup(model, data, params, batch_size)
    squares = {n: torch.zeros_like(t) for n, t in zip(names, tensors)}
    sums = {n: torch.zeros_like(t) for n, t in zip(names, tensors)}
    with eval_mode(model):
        for x, y in batches:
            for n, (sq, s) in _squares_and_sums(model, names, loss_fn, x, y, output_fn, "mean").items():
                squares[n] += sq.detach()
                sums[n] += s.detach()
    return names, {n: squares[n] / N for n in names}, {n: sums[n] / N for n in names}, N


def fisher_diagonal(model, loss_fn, data, params=None, batch_size=None, output_fn=None):
    """Diagonal of the empirical Fisher (1/N) sum_n g_n g_n^T of the per-sample loss gradients
    (``loss_fn`` the mean over its batch), as a dict name -> tensor shaped like the parameter."""
    return _gradient_moments(model, loss_fn, data, params, batch_size, output_fn)[1]


def noise_diagonal(model, loss_fn, data, params=None, batch_size=None, output_fn=None, sgd_batch_size=None,
                   without_replacement=False):
    """Diagonal of the per-sample gradient covariance C_1 = (1/N) sum_n (g_n - g)(g_n - g)^T, or of the SGD
    noise covariance C_1 / B' with ``sgd_batch_size`` B' (times (N - B') / (N - 1) without replacement),
    as ``NoiseCovarianceOperator`` defines them; a dict name -> tensor shaped like the parameter."""
    names, second, first, N = _gradient_moments(model, loss_fn, data, params, batch_size, output_fn)
    scale = sgd_noise_scale(sgd_batch_size, N, without_replacement)
    return {n: (second[n] - first[n] ** 2).clamp_min(0) * scale for n in names}


def _pseudo_loss(output, column):
    """<output, column>, summed: its backward carries ``column`` through J^T."""
    return (output * column).sum()


def ggn_diagonal(model, data, loss="cross_entropy", params=None, batch_size=None, output_fn=None):
    """Exact diagonal of the GGN J^T H J of the mean ``loss`` ("cross_entropy" or "mse", see
    ``operators.loss_hessian``) over the data, the same matrix as ``GGNOperator`` with that loss: for each
    column s_k of the square root of H (C per batch for (B, C) outputs, T x C for outputs with T
    positions), one forward and backward with per-sample capture gives J_n^T s_k for every sample, whose
    squares are summed. Returns a dict name -> tensor shaped like the parameter."""
    check_loss(loss)
    batches, names, tensors, N = _setup(model, data, params, batch_size)
    diag = {n: torch.zeros_like(t) for n, t in zip(names, tensors)}
    with eval_mode(model):
        for x, _ in batches:
            weight = batch_size_of(x) / N
            output = _output_of(model, x, output_fn)
            for column in exact_columns(loss, output, per_position=True):
                for n, (sq, _) in _squares_and_sums(model, names, _pseudo_loss, x, column, output_fn, "sum").items():
                    diag[n] += sq.detach() * weight
    return diag


def _output_of(model, x, output_fn):
    with torch.no_grad():
        return model_output(call_model(model, x), output_fn)

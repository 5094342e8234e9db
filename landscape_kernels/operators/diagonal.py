"""Exact diagonals of the curvature and noise matrices of a model's mean training loss, shaped like the
parameters (a dict name -> tensor), without forming any P x P matrix.

- ``fisher_diagonal``: the empirical Fisher (1/N) sum_n g_n^2, and ``noise_diagonal``: the per-sample
  gradient covariance (1/N) sum_n (g_n - g)^2 (divided by an SGD batch size on request), both from the
  fused per-sample moments of one forward and backward per batch;
- ``ggn_diagonal``: the generalised Gauss-Newton diagonal of the mean cross-entropy or squared error,
  sum over the columns s_k of the output-Hessian square root of the per-sample (J^T s_k)^2, each column
  one batched backward through the recorded Linear / Conv / Conv1D layers, and one forward and backward
  with per-sample capture for every other parameter (every layer the capture supports).

Data, parameters and output conventions are those of the operators (``ModelOperator``); estimators
of the diagonal of any operator (Hutchinson, XDiag) are in ``linalg.diagonal``.
"""
import torch

from ..capture.model import as_batches, batch_size_of, call_model, chosen_parameters, eval_mode, model_output
from ..capture.persample import PerSampleGradients
from .layer_records import LayerRecording, SquaredGradientSums, factor_layers, is_transformers_conv1d
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
    ``operators.loss_hessian``) over the data, the same matrix as ``GGNOperator`` with that loss: the
    columns s_k of the square root of H (C per batch for (B, C) outputs, T x C for outputs with T
    positions, each covering one position) are carried back through J, and the squares of each
    sample's gradient summed. Linear, ConvNd (groups=1) and transformers' Conv1D layers take one forward
    and batched backward passes, their per-sample squares from the fused moments of the recorded rows;
    every other parameter takes one forward and backward with per-sample capture per column. Returns a
    dict name -> tensor shaped like the parameter."""
    check_loss(loss)
    batches, names, tensors, N = _setup(model, data, params, batch_size)
    layers, others = factor_layers(model, names)
    others = [n for n, _ in others]
    diag = {n: torch.zeros_like(t) for n, t in zip(names, tensors)}
    with eval_mode(model):
        for x, _ in batches:
            weight = batch_size_of(x) / N
            output = _factor_layer_squares(model, layers, x, loss, output_fn, diag, weight) if layers else None
            if others:
                output = _output_of(model, x, output_fn) if output is None else output
                for column in exact_columns(loss, output, per_position=True):
                    squares = _squares_and_sums(model, others, _pseudo_loss, x, column, output_fn, "sum")
                    for n, (sq, _) in squares.items():
                        diag[n] += sq.detach() * weight
    return diag


def _factor_layer_squares(model, layers, x, loss, output_fn, diag, weight):
    """Add ``weight`` times the sum over columns and samples of the squared per-sample gradients of the
    factor layers' parameters (one recorded forward, batched backward passes) to ``diag``; returns the
    model's (detached) output."""
    B = batch_size_of(x)
    modules = {name: module for name, (module, _) in layers.items()}
    with torch.enable_grad(), LayerRecording(modules, B) as recording:
        output = model_output(call_model(model, x), output_fn)
    recording.check_ran("ggn_diagonal")
    inputs = recording.input_rows()
    sums = {layer: SquaredGradientSums(inputs[layer], transposed=is_transformers_conv1d(module))
            for layer, (module, _) in layers.items()}
    for rows in recording.gradient_rows(output, exact_columns(loss, output, per_position=True)):
        for layer, acc in sums.items():
            acc.add(rows[layer])
    for layer, (_, owned) in layers.items():
        for rel, name in owned.items():
            sq = sums[layer].bias() if rel == "bias" else sums[layer].weight()
            diag[name] += sq.reshape(diag[name].shape) * weight
    return output.detach()


def _output_of(model, x, output_fn):
    with torch.no_grad():
        return model_output(call_model(model, x), output_fn)

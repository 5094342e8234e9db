"""The per-sample gradient covariance (SGD noise) and the empirical Fisher, through the fused kernels."""
import torch

from ..capture.persample import PerSampleGradients
from .model import ModelOperator


def sgd_noise_scale(sgd_batch_size, num_samples, without_replacement=False):
    """The factor from the per-sample covariance C_1 to the SGD noise covariance of minibatches of
    ``sgd_batch_size`` out of ``num_samples``: 1 / B, times (N - B) / (N - 1) without replacement;
    1 when ``sgd_batch_size`` is None (C_1 itself)."""
    if sgd_batch_size is None:
        return 1.0
    if not isinstance(sgd_batch_size, int) or not 1 <= sgd_batch_size <= num_samples:
        raise ValueError(f"sgd_batch_size must be an int in [1, N = {num_samples}], got {sgd_batch_size!r}")
    scale = 1.0 / sgd_batch_size
    if without_replacement:
        scale *= (num_samples - sgd_batch_size) / max(num_samples - 1, 1)
    return scale


class NoiseCovarianceOperator(ModelOperator):
    """Per-sample gradient covariance over the dataset, C_1 = (1/N) sum_n (g_n - g)(g_n - g)^T (docs/methods.md
    conventions), applied through the fused per-sample kernels: layer inputs and output gradients are
    recorded (one forward and backward per batch) and every product is a projection and a weighted sum
    over them, never an N x P matrix. ``sgd_batch_size`` B' returns the SGD noise covariance C_1 / B'
    instead (times (N - B') / (N - 1) with ``without_replacement``). Supports the layers
    ``PerSampleGradients`` supports.

    ``keep_factors``: True (default) records every batch's factors once and keeps them (memory: the
    layer inputs and output gradients of the whole dataset, i.e. its activations); False holds one
    ``batch_size`` batch at a time and records it again in every product (one forward and backward per
    batch per product), so memory is that of one batch, as in training. Then the model must not change
    while the operator is in use. Products are centred with the mean gradient, computed at construction.
    """

    centred = True
    column_chunk = None  # projections and weighted sums take all columns at once

    def __init__(self, model, loss_fn, data, params=None, batch_size=None, sgd_batch_size=None,
                 without_replacement=False, keep_factors=True, output_fn=None):
        super().__init__(model, loss_fn, data, params, batch_size, output_fn)
        self.scale = sgd_noise_scale(sgd_batch_size, self.num_samples, without_replacement)
        if keep_factors not in (True, False):
            raise ValueError(f"keep_factors must be True or False, got {keep_factors!r}")
        self.keep_factors = keep_factors
        self._recorded = None
        recorded, self._mean = [], torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for x, y in self.batches:  # one pass: the mean gradient, and the factors when they are kept
            ps = self._record(x, y, mean_into=self._mean)
            if keep_factors:
                recorded.append(ps)
            del ps  # without keep_factors, free this batch's factors before the next are recorded
        if keep_factors:
            self._recorded = recorded

    def _record(self, x, y, mean_into=None):
        """One batch's per-sample factors. ``mean_into``: add the batch's gradient (which autograd returns
        anyway), weighted by the batch's share of the data, to this (P,) mean gradient."""
        ps = PerSampleGradients(self.model, params=self.param_names, loss_reduction="mean", output_fn=self.output_fn)
        with self.eval_mode():
            ps.compute(self.loss_fn, x, y)
        grads = [ps.batch_gradient(n) for n in self.param_names]
        if mean_into is not None:
            share = self.batch_weight(x)
            for part, g in zip(mean_into.split(self.sizes), grads):
                if g is not None:
                    part.add_(g.reshape(-1), alpha=share)
        return ps

    def per_batch_factors(self):
        """Each batch's recorded per-sample factors: the kept ones, or recorded now one batch at a time."""
        if self._recorded is not None:
            yield from self._recorded
            return
        for x, y in self.batches:
            yield self._record(x, y)

    def _matmat(self, V):
        return self._moment_matmat(V, self.centred) * self.scale

    def second_moment_matmat(self, V):
        """(1/N) sum_n g_n g_n^T V, uncentred and unscaled (what a distributed operator combines)."""
        self.check_input(V)
        return self._moment_matmat(V, centred=False)

    def mean_gradient(self):
        """(P,) mean of the per-sample gradients over the data (the full-batch gradient)."""
        return self._mean

    def _moment_matmat(self, V, centred):
        # (1/N) sum_n g_n (g_n - g)^T V: the weights are centred projections (they sum to zero up to
        # rounding), so no large uncentred moment is formed and cancelled
        vs = dict(zip(self.param_names, self.unflatten(V)))
        shift = self._mean @ V if centred else 0.0
        out = {n: torch.zeros_like(vs[n]) for n in self.param_names}
        for ps in self.per_batch_factors():
            weights = (ps.project({n: vs[n] for n in ps.param_names}) - shift) / self.num_samples
            for name, part in ps.weighted_sum(weights).items():
                out[name] += part
            del ps  # without keep_factors, free this batch's factors before the next are recorded
        return self.flatten([out[n] for n in self.param_names])


class FisherOperator(NoiseCovarianceOperator):
    """Empirical Fisher, the uncentred second moment (1/N) sum_n g_n g_n^T of the per-sample gradients."""

    centred = False

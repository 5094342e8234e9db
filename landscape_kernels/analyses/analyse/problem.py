"""What every stage of ``analyse`` works on: the model, its loss, the fixed samples, and the operators
built on them once (and shared by the stages that need the same one)."""
import math

import torch

from ...capture.model import (as_batches, batch_size_of, call_model, chosen_parameters, eval_mode, flat_values,
                             model_output)
from ...linalg.profiles import loss_profiles
from ...operators.base import Operator
from ...operators.ggn import GGNOperator
from ...operators.hessian import HessianOperator
from ...operators.noise import NoiseCovarianceOperator
from ...training.progress import Progress
from .ranks import Ranks


def parameter_groups(names):
    """[(layer, [parameter names])]: the chosen parameters grouped by the module that holds them
    ("h.0.attn.c_attn" for "h.0.attn.c_attn.weight" and its bias), in model order; a parameter held by
    the model itself forms the group "(model)"."""
    groups = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0] or "(model)", []).append(name)
    return list(groups.items())


class ProgressOperator(Operator):
    """An operator that advances a progress bar by the columns of every product."""

    def __init__(self, op, bar):
        self.op, self.bar = op, bar
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.column_chunk = None  # the wrapped operator chunks its own columns

    def _matmat(self, V):
        out = self.op.matmat(V)
        self.bar.update(V.shape[1])
        return out


class Problem:
    """The model, loss and data of one analysis, with the operators built on them on first use.

    ``batches`` are fixed: every stage sees the same samples. ``progress`` turns on a bar (a line per
    25 % off a terminal) for each long stage. Across ``ranks`` (``Ranks``), ``batches`` are this rank's
    shard and ``num_samples`` counts every shard; the operators, the loss and the profiles are those of
    the union."""

    def __init__(self, model, loss_fn, data, params=None, output_fn=None, batch_size=None, settings=None,
                 progress=False, ranks=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"analyse: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"analyse: loss_fn must be callable (outputs, targets) -> mean loss, got {type(loss_fn).__name__}")
        self.model, self.loss_fn, self.output_fn = model, loss_fn, output_fn
        self.ranks = ranks or Ranks(distributed=False)
        self.batches = self._shard(data, batch_size)
        self.shard_sizes = [int(n) for n in self.ranks.table([sum(batch_size_of(b[0]) for b in self.batches)])[:, 0]]
        self.num_samples = sum(self.shard_sizes)
        self.param_names, self.params = chosen_parameters(model, params)
        self.num_params = sum(p.numel() for p in self.params)
        self.settings, self.progress = settings, progress and self.ranks.writer
        self._operators = {}
        self.loss = self._mean_loss()

    def _shard(self, data, batch_size):
        """This rank's batches; across ranks, one rank's bad or empty shard is an error on every rank
        (none is left waiting in a collective)."""
        if not self.ranks.distributed:
            return as_batches(data, batch_size)
        try:
            batches, error = as_batches(data, batch_size), None
        except (TypeError, ValueError) as exc:
            batches, error = [], exc
        failed = [r for r, ok in enumerate(self.ranks.table([error is None])[:, 0].tolist()) if not ok]
        if error is not None:
            raise ValueError(f"analyse: the data of rank {self.ranks.rank}: {error}") from error
        if failed:
            raise ValueError(f"analyse: the data of rank(s) {failed} is empty or not usable (their error says why); every "
                             "rank needs at least one sample")
        return batches

    def _summed_loss(self):
        """The loss summed over this rank's samples at the current weights (no gradients)."""
        total = 0.0
        for x, y in self.batches:
            loss = self.loss_fn(model_output(call_model(self.model, x), self.output_fn), y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("analyse: loss_fn must return a scalar tensor (the mean loss over its batch), got "
                                 f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
            total += float(loss) * batch_size_of(x)
        return total

    def _mean_loss(self):
        """The mean loss over the samples, checked finite (a model or checkpoint that gives NaN is named)."""
        with torch.no_grad(), eval_mode(self.model):
            total = self._summed_loss()
        loss = float(self.ranks.sum(torch.tensor(total, dtype=torch.float64))) / self.num_samples
        if not math.isfinite(loss):
            raise ValueError(f"analyse: the loss over the samples is {loss}; check the model's weights (a damaged "
                             "checkpoint?) and the data")
        return loss

    # ----------------------------------------------------------------------------- operators
    def hessian(self, params=None):
        """The Hessian of the mean loss over ``params`` (None: all chosen); the full one is built once."""
        if params is None and "hessian" in self._operators:
            return self._operators["hessian"]
        op = self.ranks.operator(lambda b: HessianOperator(self.model, self.loss_fn, b, params=params or self.param_names,
                                                           output_fn=self.output_fn, keep_graph=self.settings.keep_graph),
                                 self.batches)
        if params is None:
            self._operators["hessian"] = op
        return op

    def ggn(self):
        if "ggn" not in self._operators:
            self._operators["ggn"] = self.ranks.operator(
                lambda b: GGNOperator(self.model, self.loss_fn, b, params=self.param_names, output_fn=self.output_fn),
                self.batches)
        return self._operators["ggn"]

    def noise(self):
        """The per-sample gradient covariance C_1 (its factors recorded once and kept)."""
        if "noise" not in self._operators:
            self._operators["noise"] = self.ranks.operator(
                lambda b: NoiseCovarianceOperator(self.model, self.loss_fn, b, params=self.param_names,
                                                  output_fn=self.output_fn), self.batches)
        return self._operators["noise"]

    def noise_factors(self):
        """This rank's per-batch factors of the per-sample gradients (``PerSampleGradients`` each)."""
        C = self.noise()
        return (C.op if self.ranks.distributed else C).per_batch_factors()

    def mean_gradient(self):
        """The mean gradient over every sample (every rank's)."""
        C = self.noise()
        return C.mean_gradient if self.ranks.distributed else C.mean_gradient()

    def mean_losses(self, directions, deltas):
        """(K, G) float64 mean losses over every sample at theta0 + deltas[g] directions[k] (the
        batched loss-profile engine on this rank's batches, weighted over the ranks)."""
        p0 = self.params[0]
        D = torch.as_tensor(directions).to(p0.device, p0.dtype)
        local = loss_profiles(self.model, self.loss_fn, self.batches, D, deltas, params=self.param_names,
                              output_fn=self.output_fn)
        if not self.ranks.distributed:
            return local.numpy()
        weight = self.shard_sizes[self.ranks.rank] / self.num_samples
        return self.ranks.sum(local * weight).numpy()

    def mean_losses_one_by_one(self, directions, deltas):
        """``mean_losses`` point by point: the weights set to theta0 + delta d and the model run on every
        batch (restored afterwards, also on an error)."""
        p0 = self.params[0]
        D = torch.as_tensor(directions).to(p0.device, p0.dtype)
        deltas = [float(d) for d in deltas]
        theta = [p.detach().clone() for p in self.params]
        sizes = [p.numel() for p in self.params]
        totals = torch.zeros(D.shape[0], len(deltas), dtype=torch.float64)
        try:
            with torch.no_grad(), eval_mode(self.model):
                for k, d in enumerate(D):
                    parts = torch.split(d, sizes)
                    for g, delta in enumerate(deltas):
                        for p, t, part in zip(self.params, theta, parts):
                            p.copy_(t).add_(part.view_as(p), alpha=delta)
                        totals[k, g] = self._summed_loss()
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, theta):
                    p.copy_(t)
        return (self.ranks.sum(totals) / self.num_samples).numpy()

    # ----------------------------------------------------------------------------- helpers
    def bar(self, total, desc, unit="product"):
        """A progress bar for a stage (a silent one without ``progress``)."""
        return Progress(total, desc=desc, unit=unit, percent_step=25) if self.progress else _Silent()

    def tracked(self, op, bar):
        return ProgressOperator(op, bar)

    def flat_parameters(self):
        return flat_values(self.params)

    def split(self, flat):
        """A flat (P,) vector as {parameter name: tensor shaped like it}."""
        parts = torch.split(flat, [p.numel() for p in self.params])
        return {n: t.reshape(p.shape) for n, t, p in zip(self.param_names, parts, self.params)}


class _Silent:
    def update(self, n=1, **postfix):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Matrix-free symmetric operators of a model's training loss over a fixed dataset (DESIGN §2.3).

Every operator has ``shape`` (P, P), ``dtype``, ``device``, ``matmat(V)`` for V of shape (P, K) (one
pass over the data serves all K columns), ``matvec``, ``@`` and ``to_scipy()``. P counts the chosen
parameters (``params``: None for all trainable ones, or a list of names), flattened in model order.
The loss is the mean over the dataset of ``loss_fn(model(x), y)``, which must itself be the mean over
its batch; batches are weighted by their size. The model is put in eval mode for the products and
restored afterwards.
"""
import contextlib

import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import mlp_hvp
from .persample import PerSampleGradients


def _as_batches(data, batch_size):
    """A list of (inputs, targets) batches from a (inputs, targets) pair of tensors or an iterable."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: inputs and targets differ in length: {x.shape[0]} and {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError("data: no samples (an empty dataset)")
        step = batch_size or x.shape[0]
        batches = [(x[i : i + step], y[i : i + step]) for i in range(0, x.shape[0], step)]
    else:
        batches = [tuple(b) for b in data]
    batches = [b for b in batches if b[0].shape[0] > 0]
    if not batches:
        raise ValueError("data: no samples (an empty dataset or only empty batches)")
    return batches


def chosen_parameters(model, params):
    """(names, tensors) of ``params`` (None: every trainable parameter), in the order given."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"params: {missing} are not parameters of the model (it has {list(named)})")
    if not names:
        raise ValueError("params: no parameters chosen")
    if len(set(names)) != len(names):
        raise ValueError(f"params: {names} names a parameter more than once")
    return names, [named[n] for n in names]


class Operator:
    """Base of the symmetric operators: a subclass provides ``_matmat`` for one chunk of columns."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device
    # Columns per autograd call: batching a few products amortises the graph traversal, while very
    # wide batches cost more than they save (measured on the MNIST MLP: 8 best, 100 as slow as 1).
    column_chunk = 8

    def matmat(self, V):
        """A V for V of shape (P, K)."""
        self._check(V)
        if self.column_chunk is None or V.shape[1] <= self.column_chunk:
            return self._matmat(V)
        return torch.cat([self._matmat(c) for c in V.split(self.column_chunk, 1)], 1)

    def _matmat(self, V):
        raise NotImplementedError

    def matvec(self, v):
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def __matmul__(self, x):
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def _check(self, V):
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"{type(self).__name__}.matmat: V must have shape ({self.shape[0]}, K), got "
                             f"{tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__}")
        if V.dtype != self.dtype or V.device != self.device:
            raise ValueError(f"{type(self).__name__}.matmat: V must be {self.dtype} on {self.device}, got {V.dtype} on {V.device}")

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out), e.g. for ``eigsh``."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mm(X):
            X = np.asarray(X, dtype=np.float64).reshape(self.shape[0], -1)
            out = self.matmat(torch.from_numpy(X).to(self.device, self.dtype))
            return out.detach().double().cpu().numpy()

        return LinearOperator(self.shape, matvec=lambda x: mm(x).reshape(-1), matmat=mm, dtype=np.float64)


class _ModelOperator(Operator):
    """Shared set-up of the operators of a model's loss: data, parameters, flattening, eval mode."""

    def __init__(self, model, loss_fn, data, params=None, batch_size=None):
        self.model, self.loss_fn = model, loss_fn
        self.batches = _as_batches(data, batch_size)
        self.num_samples = sum(b[0].shape[0] for b in self.batches)
        self.param_names, self.params = chosen_parameters(model, params)
        self.sizes = [p.numel() for p in self.params]
        P = sum(self.sizes)
        self.shape = (P, P)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device

    def _unflatten(self, V):
        """(P, K) -> list of (K, *shape) per parameter."""
        return [c.T.reshape(-1, *p.shape) for c, p in zip(torch.split(V, self.sizes), self.params)]

    @staticmethod
    def _flatten(parts):
        """list of (K, *shape) -> (P, K)."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1).T

    def _eval_mode(self):
        model = self.model

        class _Eval:
            def __enter__(self_):
                self_.was_training = model.training
                model.eval()

            def __exit__(self_, *exc):
                model.train(self_.was_training)

        return _Eval()

    def _batch_loss(self, param_values, x, y):
        values = dict(zip(self.param_names, param_values))
        return self.loss_fn(functional_call(self.model, values, (x,), strict=False), y)

    def _weight(self, x):
        return x.shape[0] / self.num_samples


class HessianOperator(_ModelOperator):
    """Hessian of the mean training loss. ``method``:

    - "auto" (default): "rop" where it applies, else "double_backward";
    - "rop": exact R-operator products for an ``nn.Sequential`` of Linear layers and elementwise
      activations (ReLU, LeakyReLU, Tanh, Sigmoid; Identity, Dropout and Flatten pass through) under
      mean cross-entropy or mean squared error, every column in the same GEMMs and no autograd graph
      (``mlp_hvp``); 1.5-2x faster per product than the kept double-backward graph on the MNIST MLP;
    - "double_backward": with ``keep_graph`` the gradient graphs of all batches are kept across
      products, trading memory for one forward and backward per product;
    - "forward_over_reverse": torch.func jvp of grad, vmapped over the K columns;
    - "finite_difference": central differences of gradients, for models without double backward.

    ``keep_graph`` keeps what the products of a batch need across products (the gradient graph for
    double backward; activations, backward errors and activation derivatives for "rop").
    ``batched_backward`` (double backward only): True runs the K columns of a chunk as one vmapped
    backward pass, False as K backward passes over the shared gradient graph; None (default) picks
    False for models with convolutions, whose vmapped double backward is slower than the loop on
    CPU (measured 1.5x on the MNIST SimpleCNN), and True otherwise (1.4x faster on the MNIST MLP).
    ``math_attention``: run ``scaled_dot_product_attention`` on its math backend during the products;
    the fused (flash / memory-efficient) backends have no double backward or forward-mode derivative,
    so transformer models need this switch or ``method="finite_difference"`` (the error says so)."""

    METHODS = ("auto", "rop", "double_backward", "forward_over_reverse", "finite_difference")

    def __init__(self, model, loss_fn, data, params=None, method="auto", batch_size=None,
                 keep_graph=False, fd_eps=None, batched_backward=None, math_attention=False):
        super().__init__(model, loss_fn, data, params, batch_size)
        self.math_attention = bool(math_attention)
        if method not in self.METHODS:
            raise ValueError(f"HessianOperator: method must be one of {self.METHODS}, got {method!r}")
        if batched_backward not in (None, True, False):
            raise ValueError(f"HessianOperator: batched_backward must be None, True or False, got {batched_backward!r}")
        if batched_backward is None:
            batched_backward = not any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
        if method in ("auto", "rop"):
            x, y = self.batches[0]
            reason = mlp_hvp.unsupported_reason(model, loss_fn, self.param_names, x, y)
            if method == "rop" and reason:
                raise ValueError(f"HessianOperator: method='rop' does not apply: {reason}")
            method = "double_backward" if reason else "rop"
        self.method, self.keep_graph, self.fd_eps = method, keep_graph, fd_eps
        self.batched_backward = batched_backward
        self._graphs = None
        if method == "rop":
            self._rop_engine = mlp_hvp.MLPHessianProducts(model, loss_fn, self.param_names)
            self.column_chunk = 32  # no graph traversal to amortise: wider GEMMs only help

    def _matmat(self, V):
        attention = sdpa_kernel(SDPBackend.MATH) if self.math_attention else contextlib.nullcontext()
        with self._eval_mode(), attention:
            try:
                return getattr(self, "_" + self.method)(V)
            except (RuntimeError, NotImplementedError) as exc:
                if "scaled_dot_product" in str(exc) or "_flash_attention" in str(exc) or "efficient_attention" in str(exc):
                    raise RuntimeError(
                        f"HessianOperator: method {self.method!r} needs second derivatives of scaled_dot_product_attention, "
                        "which its fused backends lack; pass math_attention=True (exact, the math backend) or "
                        f"method='finite_difference' (no second derivatives). Original error: {exc}") from exc
                raise

    def _per_batch(self, make):
        """``make(x, y)`` for each batch: the kept results (keep_graph=True, after the first pass), or one
        batch at a time, so that memory holds one batch's graph or state, not every batch's at once."""
        if self._graphs is not None:
            yield from self._graphs
            return
        kept = [] if self.keep_graph else None
        for x, y in self.batches:
            state = make(x, y)
            if kept is not None:
                kept.append(state)
            yield state
            del state  # the caller's loop variable is then the last reference
        if kept is not None:
            self._graphs = kept

    def _rop_state(self, x, y):
        return self._rop_engine.prepare(x, y, self._weight(x))

    def _rop(self, V):
        vs = self._unflatten(V)
        out = None
        for state in self._per_batch(self._rop_state):
            hv = self._rop_engine.products(state, vs)
            out = hv if out is None else [o.add_(h) for o, h in zip(out, hv)]
            del state  # free this batch's state before the next one is prepared
        return self._flatten(out)

    def _gradient_with_graph(self, x, y):
        """(parameters, the batch's gradients with their graph) for double backward."""
        values = [p.detach().requires_grad_(True) for p in self.params]
        loss = self._batch_loss(values, x, y) * self._weight(x)
        return values, torch.autograd.grad(loss, values, create_graph=True)

    def _double_backward(self, V):
        vs = self._unflatten(V)
        out = [torch.zeros_like(v) for v in vs]
        for values, grads in self._per_batch(self._gradient_with_graph):
            if self.batched_backward:
                hv = torch.autograd.grad(grads, values, grad_outputs=vs, retain_graph=True, is_grads_batched=True)
                for o, h in zip(out, hv):
                    o.add_(h)
            else:
                for k in range(V.shape[1]):
                    hv = torch.autograd.grad(grads, values, grad_outputs=[v[k] for v in vs], retain_graph=True)
                    for o, h in zip(out, hv):
                        o[k].add_(h)
            del values, grads, hv  # free this batch's graph before the next one is built
        return self._flatten(out)

    def _forward_over_reverse(self, V):
        vs = self._unflatten(V)
        primals = tuple(p.detach() for p in self.params)
        out = [torch.zeros_like(v) for v in vs]
        for x, y in self.batches:
            w = self._weight(x)

            def grad_fn(*values, x=x, y=y, w=w):
                return grad(lambda *vals: self._batch_loss(vals, x, y) * w, argnums=tuple(range(len(values))))(*values)

            def hvp(*tangents):
                return jvp(grad_fn, primals, tangents)[1]

            for o, h in zip(out, vmap(hvp)(*vs)):
                o.add_(h)
        return self._flatten(out)

    def _full_gradient(self, values):
        total = [torch.zeros_like(v) for v in values]
        for x, y in self.batches:
            vals = [v.detach().requires_grad_(True) for v in values]
            for t, g in zip(total, torch.autograd.grad(self._batch_loss(vals, x, y) * self._weight(x), vals)):
                t.add_(g)
        return total

    def _finite_difference(self, V):
        theta = [p.detach() for p in self.params]
        scale = 1.0 + float(torch.sqrt(sum(t.double().pow(2).sum() for t in theta)))
        eps0 = self.fd_eps or (torch.finfo(self.dtype).eps ** (1 / 3)) * scale
        cols, vs = [], self._unflatten(V)
        for k in range(V.shape[1]):
            vk = [c[k] for c in vs]
            norm = float(torch.sqrt(sum(c.double().pow(2).sum() for c in vk)))
            if norm == 0:
                cols.append(torch.zeros(self.shape[0], dtype=self.dtype, device=self.device))
                continue
            eps = eps0 / norm
            plus = self._full_gradient([t + eps * c for t, c in zip(theta, vk)])
            minus = self._full_gradient([t - eps * c for t, c in zip(theta, vk)])
            cols.append(torch.cat([((a - b) / (2 * eps)).reshape(-1) for a, b in zip(plus, minus)]))
        return torch.stack(cols, 1)


class GGNOperator(_ModelOperator):
    """Generalised Gauss-Newton J^T H_out J averaged over the data, H_out the Hessian of the loss in the
    model outputs (exact for any loss: taken by double backward in output space, e.g. diag(s) - s s^T
    per sample for cross-entropy)."""

    def _matmat(self, V):
        vs = self._unflatten(V)
        primals = tuple(p.detach() for p in self.params)
        out = [torch.zeros_like(v) for v in vs]
        with self._eval_mode():
            for x, y in self.batches:
                w = self._weight(x)

                def f(*values, x=x):
                    return functional_call(self.model, dict(zip(self.param_names, values)), (x,), strict=False)

                Jv = vmap(lambda *t: jvp(f, primals, t)[1])(*vs)  # (K, *output)
                o = f(*primals).detach().requires_grad_(True)
                g = torch.autograd.grad(self.loss_fn(o, y) * w, o, create_graph=True)[0]
                HJv = torch.autograd.grad(g, o, grad_outputs=Jv, is_grads_batched=True)[0]
                values = [p.detach().requires_grad_(True) for p in self.params]
                outputs = f(*values)
                JtHJv = torch.autograd.grad(outputs, values, grad_outputs=HJv, is_grads_batched=True)
                for acc, h in zip(out, JtHJv):
                    acc.add_(h)
        return self._flatten(out)


class NoiseCovarianceOperator(_ModelOperator):
    """Per-sample gradient covariance over the dataset, C_1 = (1/N) sum_n (g_n - g)(g_n - g)^T (SPEC
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
                 without_replacement=False, keep_factors=True):
        super().__init__(model, loss_fn, data, params, batch_size)
        self._modules = sorted({n.rsplit(".", 1)[0] if "." in n else "" for n in self.param_names})
        self.scale = 1.0
        if sgd_batch_size is not None:
            if not isinstance(sgd_batch_size, int) or not 1 <= sgd_batch_size <= self.num_samples:
                raise ValueError(f"sgd_batch_size must be an int in [1, N = {self.num_samples}], got {sgd_batch_size!r}")
            self.scale = 1.0 / sgd_batch_size
            if without_replacement:
                N = self.num_samples
                self.scale *= (N - sgd_batch_size) / max(N - 1, 1)
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
        ps = PerSampleGradients(self.model, layers=self._modules, loss_reduction="mean")
        if sorted(ps.param_names) != sorted(self.param_names):
            raise ValueError(f"params: the per-sample kernels cover {ps.param_names}, the operator was asked for "
                             f"{self.param_names}")
        params = dict(self.model.named_parameters())
        with self._eval_mode(), ps:
            grads = torch.autograd.grad(self.loss_fn(self.model(x), y), [params[n] for n in self.param_names],
                                        allow_unused=True)
        if mean_into is not None:
            share = x.shape[0] / self.num_samples
            for part, g in zip(mean_into.split(self.sizes), grads):
                if g is not None:
                    part.add_(g.reshape(-1), alpha=share)
        return ps

    def _factors(self):
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
        self._check(V)
        return self._moment_matmat(V, centred=False)

    def mean_gradient(self):
        """(P,) mean of the per-sample gradients over the data (the full-batch gradient)."""
        return self._mean

    def _moment_matmat(self, V, centred):
        # (1/N) sum_n g_n (g_n - g)^T V: the weights are centred projections (they sum to zero up to
        # rounding), so no large uncentred moment is formed and cancelled
        vs = dict(zip(self.param_names, self._unflatten(V)))
        shift = self._mean @ V if centred else 0.0
        out = {n: torch.zeros_like(vs[n]) for n in self.param_names}
        for ps in self._factors():
            weights = (ps.project({n: vs[n] for n in ps.param_names}) - shift) / self.num_samples
            for name, part in ps.weighted_sum(weights).items():
                out[name] += part
            del ps  # without keep_factors, free this batch's factors before the next are recorded
        return self._flatten([out[n] for n in self.param_names])


class FisherOperator(NoiseCovarianceOperator):
    """Empirical Fisher, the uncentred second moment (1/N) sum_n g_n g_n^T of the per-sample gradients."""

    centred = False

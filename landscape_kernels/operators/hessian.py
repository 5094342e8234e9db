"""``HessianOperator``: products with the Hessian of a model's mean training loss, by the R-operator,
double backward, forward-over-reverse or finite differences."""
import copy

import torch
from torch.func import grad, jvp, vmap

from ..capture.model import cast_floating
from . import rop
from .model import ModelOperator


# the layers of a "plain MLP" (an nn.Sequential of these), whose vmapped double backward is the faster one
MLP_LAYERS = (torch.nn.Sequential, torch.nn.Linear, torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.Tanh,
              torch.nn.Sigmoid, torch.nn.GELU, torch.nn.SiLU, torch.nn.ELU, torch.nn.Softplus, torch.nn.Identity,
              torch.nn.Dropout, torch.nn.Flatten)


def is_plain_mlp(model):
    """Whether ``model`` is an nn.Sequential of Linear and elementwise layers only (no custom module,
    whose forward may hold attention or convolutions)."""
    return all(type(m) in MLP_LAYERS for m in model.modules())


class HessianOperator(ModelOperator):
    """Hessian of the mean training loss. ``method``:

    - "auto" (default): "rop" where it applies, else "double_backward";
    - "rop": exact R-operator products for an ``nn.Sequential`` of Linear layers and elementwise
      activations (ReLU, LeakyReLU, Tanh, Sigmoid; Identity, Dropout and Flatten pass through) under
      mean cross-entropy or mean squared error, every column in the same GEMMs and no autograd graph
      (``operators.rop``); 1.5-2x faster per product than the kept double-backward graph on the MNIST MLP;
    - "double_backward": with ``keep_graph`` the gradient graphs of all batches are kept across
      products, trading memory for one forward and backward per product;
    - "forward_over_reverse": torch.func jvp of grad, vmapped over the K columns;
    - "finite_difference": central differences of gradients, for models without double backward. The
      gradients are taken on a float64 copy of a lower-precision model (``fd_dtype``), with the step
      ``fd_eps`` (default: the cube root of the evaluation dtype's machine epsilon times the root mean
      square parameter, at least 1, per unit of the direction's norm); every column is also taken at twice
      the step, and a column whose two estimates differ by more than ``fd_tolerance`` of its norm
      (the truncation or rounding error is then too large) raises an error instead of a wrong product.

    ``keep_graph`` keeps what the products of a batch need across products (the gradient graph for
    double backward; activations, backward errors and activation derivatives for "rop"). None
    (default): kept when the data is one batch. A product then holds that one batch's graph at its peak
    either way, so keeping it costs no more peak memory, only memory held between products (until the
    operator is dropped), and saves the forward and backward that rebuild it: 1.6x per product on the
    MNIST SimpleCNN, 1.5x on a GPT (bench/products.py). With several batches it keeps
    every batch's graph, so it is kept only when asked for (True). What is kept is rebuilt when a
    parameter or buffer changed since (an optimiser step, ``load_state_dict``, batch-norm statistics: any
    in-place update or new storage).
    ``batched_backward`` (double backward only): True runs the K columns of a chunk as one vmapped
    backward pass, False as K backward passes over the shared gradient graph; None (default) picks
    True for models made of Linear layers and elementwise layers only (1.4x faster on the MNIST MLP)
    and False otherwise: the vmapped double backward of convolutions ran 1.5x slower on the MNIST
    SimpleCNN, and that of a 13.8M-parameter GPT-2 1.4x slower (373 s against 265 s for the top-5
    eigenvalues, 61 products each), with 9.7 GB against 7.1 GB (bench/real_models.py).
    ``math_attention``: run ``scaled_dot_product_attention`` on its math backend during the products;
    the fused (flash / memory-efficient) backends have no double backward or forward-mode derivative.
    None (default): switch to it when a product needs it (exact; see ``ModelOperator.attention_safe``);
    False: raise an error that names the switch instead."""

    METHODS = ("auto", "rop", "double_backward", "forward_over_reverse", "finite_difference")

    def __init__(self, model, loss_fn, data, params=None, method="auto", batch_size=None,
                 keep_graph=None, fd_eps=None, batched_backward=None, math_attention=None, output_fn=None,
                 fd_dtype=torch.float64, fd_tolerance=1e-4):
        super().__init__(model, loss_fn, data, params, batch_size, output_fn, math_attention)
        self.fd_dtype, self.fd_tolerance, self._fd_model = fd_dtype, float(fd_tolerance), None
        if method not in self.METHODS:
            raise ValueError(f"HessianOperator: method must be one of {self.METHODS}, got {method!r}")
        if keep_graph not in (None, True, False):
            raise ValueError(f"HessianOperator: keep_graph must be None, True or False, got {keep_graph!r}")
        if keep_graph is None:
            keep_graph = len(self.batches) == 1
        if batched_backward not in (None, True, False):
            raise ValueError(f"HessianOperator: batched_backward must be None, True or False, got {batched_backward!r}")
        if batched_backward is None:
            batched_backward = is_plain_mlp(model)
        if method in ("auto", "rop"):
            x, y = self.batches[0]
            reason = rop.unsupported_reason(model, loss_fn, self.param_names, x, y)
            if method == "rop" and reason:
                raise ValueError(f"HessianOperator: method='rop' does not apply: {reason}")
            method = "double_backward" if reason else "rop"
        self.method, self.keep_graph, self.fd_eps = method, keep_graph, fd_eps
        self.batched_backward = batched_backward
        self._graphs, self._kept_at = None, None
        if method == "rop":
            self._rop_engine = rop.MLPHessianProducts(model, loss_fn, self.param_names)
            self.column_chunk = 32  # no graph traversal to amortise: wider GEMMs only help

    def _matmat(self, V):
        with self.eval_mode():
            return self.attention_safe(lambda: getattr(self, "_" + self.method)(V))

    def _per_batch(self, make):
        """``make(x, y)`` for each batch: the kept results (keep_graph=True, after the first pass), or one
        batch at a time, so that memory holds one batch's graph or state, not every batch's at once.
        Kept results are dropped when a parameter changed after they were made."""
        if self._graphs is not None and self._kept_at != self._parameter_state():
            self._graphs = None  # stale: the parameters moved (or were replaced) since
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
            self._graphs, self._kept_at = kept, self._parameter_state()

    def _parameter_state(self):
        """What tells whether the parameters (or the buffers, such as batch-norm statistics) changed: each
        one's storage and in-place version counter."""
        return [(t.data_ptr(), t._version) for t in (*self.params, *self.model.buffers())]

    def _rop_state(self, x, y):
        return self._rop_engine.prepare(x, y, self.batch_weight(x))

    def _rop(self, V):
        vs = self.unflatten(V)
        out = None
        for state in self._per_batch(self._rop_state):
            hv = self._rop_engine.products(state, vs)
            out = hv if out is None else [o.add_(h) for o, h in zip(out, hv)]
            del state  # free this batch's state before the next one is prepared
        return self.flatten(out)

    def _gradient_with_graph(self, x, y):
        """(parameters, the batch's gradients with their graph) for double backward."""
        values = [p.detach().requires_grad_(True) for p in self.params]
        loss = self.batch_loss(values, x, y) * self.batch_weight(x)
        return values, torch.autograd.grad(loss, values, create_graph=True)

    def _double_backward(self, V):
        vs = self.unflatten(V)
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
        return self.flatten(out)

    def _forward_over_reverse(self, V):
        vs = self.unflatten(V)
        primals = tuple(p.detach() for p in self.params)
        out = [torch.zeros_like(v) for v in vs]
        for x, y in self.batches:
            w = self.batch_weight(x)

            def grad_fn(*values, x=x, y=y, w=w):
                return grad(lambda *vals: self.batch_loss(vals, x, y) * w, argnums=tuple(range(len(values))))(*values)

            def hvp(*tangents):
                return jvp(grad_fn, primals, tangents)[1]

            for o, h in zip(out, vmap(hvp)(*vs)):
                o.add_(h)
        return self.flatten(out)

    def _full_gradient(self, model, values, dtype):
        """The gradient of the mean loss of ``model`` (the operator's model or its copy in ``dtype``) at
        the chosen parameters ``values``."""
        total = [torch.zeros_like(v) for v in values]
        for x, y in self.batches:
            vals = [v.detach().requires_grad_(True) for v in values]
            out = self.output(vals, cast_floating(x, dtype), model)
            loss = self.loss_fn(out, cast_floating(y, dtype)) * self.batch_weight(x)
            for t, g in zip(total, torch.autograd.grad(loss, vals)):
                t.add_(g)
        return total

    def _finite_difference_model(self):
        """(model, dtype) the gradients are evaluated with: the model itself, or its copy in ``fd_dtype``
        when that is more precise (made once, the parameters are those of the first product)."""
        dtype = self.fd_dtype if torch.finfo(self.fd_dtype).eps < torch.finfo(self.dtype).eps else self.dtype
        if dtype == self.dtype:
            return self.model, dtype
        if self._fd_model is None:
            self._fd_model = copy.deepcopy(self.model).to(dtype)
        return self._fd_model, dtype

    def _finite_difference(self, V):
        model, dtype = self._finite_difference_model()
        theta = [p.detach().to(dtype) for p in self.params]
        rms = float(torch.sqrt(sum(t.pow(2).sum() for t in theta) / sum(t.numel() for t in theta)))
        eps0 = self.fd_eps or (torch.finfo(dtype).eps ** (1 / 3)) * max(1.0, rms)
        cols, vs = [], self.unflatten(V.to(dtype))

        def difference(vk, eps):
            plus = self._full_gradient(model, [t + eps * c for t, c in zip(theta, vk)], dtype)
            minus = self._full_gradient(model, [t - eps * c for t, c in zip(theta, vk)], dtype)
            return torch.cat([((a - b) / (2 * eps)).reshape(-1) for a, b in zip(plus, minus)])

        for k in range(V.shape[1]):
            vk = [c[k] for c in vs]
            norm = float(torch.sqrt(sum(c.pow(2).sum() for c in vk)))
            if norm == 0:
                cols.append(torch.zeros(self.shape[0], dtype=dtype, device=self.device))
                continue
            eps = eps0 / norm
            col, wider = difference(vk, eps), difference(vk, 2 * eps)
            error, size = float((col - wider).norm()) / 3, float(col.norm())  # central differences: O(eps^2)
            if error > self.fd_tolerance * size + 1e3 * torch.finfo(dtype).tiny:
                raise RuntimeError(
                    f"HessianOperator: finite differences cannot give column {k} to {self.fd_tolerance:g} relative: "
                    f"the estimates at steps {eps:.3g} and {2 * eps:.3g} differ by {error / max(size, 1e-300):.2g} of "
                    f"its norm (evaluated in {dtype}); pass fd_eps, fd_dtype=torch.float64, or use an exact method "
                    "(method='double_backward', with math_attention=True for attention)")
            cols.append(col)
        return torch.stack(cols, 1).to(self.dtype)

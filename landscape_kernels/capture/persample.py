"""Per-sample gradient statistics of a model from one ordinary backward pass.

``PerSampleGradients`` hooks ``nn.Linear`` (inputs of any rank >= 2, with or without bias),
``nn.Conv2d`` (through input patches), ``nn.Embedding`` (one-hot positions: memory B x T x vocabulary)
and ``nn.LayerNorm`` (its few per-sample gradients formed explicitly), records each layer's inputs A and output gradients D during one
forward + backward, and computes statistics of the per-sample gradients G_b = sum_t D[b,t]^T A[b,t]
with the fused ops, never holding the batch x parameters tensor.

Scale convention: every statistic is of the per-sample *loss* gradients g_b = grad l_b, whatever the
reduction of the batch loss. With ``loss_reduction="mean"`` (loss = (1/B) sum_b l_b) the recorded
output gradients are multiplied by B; with ``"sum"`` they are used as they are. ``variance()`` is the
population variance over the batch (the diagonal of C_1 in the conventions of docs/methods.md; ``correction=1`` gives
the unbiased one), ``cov_matvec`` applies C_1 (divide by the SGD batch size for the noise covariance).

A layer applied several times in one forward (weight sharing) is handled exactly: its calls are joined
along the position axis T, since G_b sums over positions. Parameters of other modules are listed in an
error, or, with ``fallback="vmap"``, handled by chunked ``torch.func`` per-sample gradients (which needs
the loss, so statistics are then taken through ``compute(loss_fn, inputs, targets)``).
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import ops
from ..kernels.checks import check_finite
from .layers import call_factors, has_explicit_gradients, layer_norm_gradients, unsupported_reason


@dataclass
class _Layer:
    """A hooked module, its trainable parameters and what one forward/backward recorded."""

    name: str
    module: nn.Module
    weight: str = None  # qualified parameter names, None when absent or frozen
    bias: str = None
    inputs: list = field(default_factory=list)
    grads: dict = field(default_factory=dict)

    def param_names(self):
        return [n for n in (self.weight, self.bias) if n is not None]


class PerSampleGradients:
    """Context manager giving per-sample gradient statistics of ``model``'s hooked parameters.

    Usage::

        ps = PerSampleGradients(model)            # all Linear / Conv2d layers
        with ps:
            loss = F.cross_entropy(model(x), y)   # reduction="mean", as loss_reduction says
            loss.backward()
        ps.sq_norms(), ps.gram(), ps.variance(), ps.project(V), ps.cov_matvec(V)

    Args:
        model: the ``nn.Module``.
        layers: ``None`` (every module that has trainable parameters) or a list of module names or
            modules to hook.
        loss_reduction: ``"mean"`` or ``"sum"``: how the batch loss reduces the per-sample losses.
        fallback: ``"error"`` (parameters of unsupported modules raise a ``ValueError`` listing them) or
            ``"vmap"`` (their per-sample gradients come from chunked ``torch.func``; use ``compute``).
        vmap_chunk_size: samples per ``torch.func`` call in the fallback.
    """

    def __init__(self, model, layers=None, loss_reduction="mean", fallback="error", vmap_chunk_size=64):
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerSampleGradients: model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"PerSampleGradients: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if fallback not in ("error", "vmap"):
            raise ValueError(f"PerSampleGradients: fallback must be 'error' or 'vmap', got {fallback!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.fallback = fallback
        self.vmap_chunk_size = int(vmap_chunk_size)
        self._layers, self._fallback_params = self._resolve(layers)
        self._handles = []
        self._fallback_grads = None  # (B, P_fallback) after compute()
        self._batch_size = None
        self._cache = {}
        names = [n for layer in self._layers for n in layer.param_names()] + list(self._fallback_params)
        params = dict(model.named_parameters())
        self.param_names = names
        self.param_shapes = {n: tuple(params[n].shape) for n in names}
        self.num_params = sum(params[n].numel() for n in names)

    # ----------------------------------------------------------------------------------- set-up
    def _resolve(self, layers):
        named = dict(self.model.named_modules())
        if layers is None:
            chosen = [(n, m) for n, m in named.items() if any(p.requires_grad for p in m.parameters(recurse=False))]
        else:
            by_id = {id(m): n for n, m in named.items()}
            chosen = []
            for item in layers:
                if isinstance(item, str):
                    if item not in named:
                        raise ValueError(f"PerSampleGradients: layers names {item!r}, which is not a module of the model")
                    chosen.append((item, named[item]))
                elif isinstance(item, nn.Module) and id(item) in by_id:
                    chosen.append((by_id[id(item)], item))
                else:
                    raise ValueError(f"PerSampleGradients: layers must hold module names or modules of the model, got {item!r}")
        hooked, fallback, unsupported = [], {}, []
        for name, module in chosen:
            own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            qual = {pn: f"{name}.{pn}" if name else pn for pn, _ in own}
            reason = unsupported_reason(module)
            if reason is None:
                hooked.append(_Layer(name, module, weight=qual.get("weight"), bias=qual.get("bias")))
            elif self.fallback == "vmap":
                fallback.update({qual[pn]: p for pn, p in own})
            else:
                unsupported.append(f"{name or '<model>'} ({reason}: {', '.join(qual[pn] for pn, _ in own)})")
        if unsupported:
            raise ValueError(
                "PerSampleGradients: no fused per-sample kernels for the parameters of "
                + "; ".join(unsupported)
                + ". Pass layers=[...] to leave them out, freeze them (requires_grad=False), "
                "or use fallback='vmap' with compute(loss_fn, inputs, targets)."
            )
        if not hooked and not fallback:
            raise ValueError("PerSampleGradients: the model has no trainable parameters in the chosen layers")
        return hooked, fallback

    def __enter__(self):
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    "PerSampleGradients: BatchNorm in training mode mixes the samples of a batch, so per-sample "
                    "gradients are not defined; call model.eval() first"
                )
        for layer in self._layers:
            layer.inputs.clear()
            layer.grads.clear()
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        self._cache.clear()
        self._fallback_grads = None
        self._batch_size = None
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _forward_hook(self, layer):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            index = len(layer.inputs)
            layer.inputs.append(args[0].detach())

            def store(grad):
                layer.grads[index] = grad.detach()

            output.register_hook(store)

        return hook

    # ---------------------------------------------------------------------------- capture helper
    def compute(self, loss_fn, inputs, targets):
        """Run forward and backward of ``loss_fn(model(inputs), targets)`` under the hooks (gradients are
        taken with ``torch.autograd.grad``, so ``.grad`` is left alone) and, with ``fallback="vmap"``,
        the per-sample gradients of the fallback parameters. Returns the batch loss."""
        params = [p for n, p in self.model.named_parameters() if n in self.param_shapes]
        with self:
            loss = loss_fn(self.model(inputs), targets)
            torch.autograd.grad(loss, params, allow_unused=True)
        if self._fallback_params:
            self._fallback_grads = self._vmap_gradients(loss_fn, inputs, targets)
        return loss.detach()

    def _vmap_gradients(self, loss_fn, inputs, targets):
        from torch.func import functional_call, grad, vmap

        names = list(self._fallback_params)
        fixed = {n: t.detach() for n, t in self.model.named_parameters() if n not in self._fallback_params}
        fixed.update(dict(self.model.named_buffers()))

        def sample_loss(trainable, x, y):
            out = functional_call(self.model, {**fixed, **trainable}, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        trainable = {n: self._fallback_params[n].detach() for n in names}
        rows = []
        for start in range(0, inputs.shape[0], self.vmap_chunk_size):
            g = per_sample(trainable, inputs[start : start + self.vmap_chunk_size], targets[start : start + self.vmap_chunk_size])
            rows.append(torch.cat([g[n].flatten(1) for n in names], 1))
        return torch.cat(rows)

    # ------------------------------------------------------------------- recorded layer blocks
    def _blocks(self):
        """One ``_Block`` per parameter: the weight and bias of each hooked layer, then the fallback ones."""
        if "blocks" in self._cache:
            return self._cache["blocks"]
        if self._handles:
            raise RuntimeError("PerSampleGradients: statistics are available after the `with` block has ended")
        blocks = [b for layer in self._layers for b in self._layer_blocks(layer)]
        if self._fallback_params:
            if self._fallback_grads is None:
                raise RuntimeError(
                    "PerSampleGradients: parameters " + ", ".join(self._fallback_params) + " use the vmap fallback, "
                    "which needs the loss: take the statistics through compute(loss_fn, inputs, targets)"
                )
            # per-sample gradients as A with D = 1 (G_b = 1 x g_b), one block per parameter
            G = self._fallback_grads
            ones = G.new_ones(G.shape[0], 1)
            start = 0
            for name in self._fallback_params:
                size = int(torch.Size(self.param_shapes[name]).numel())
                blocks.append(_Block(name, self.param_shapes[name], None, G[:, start : start + size], ones))
                start += size
        self._cache["blocks"] = blocks
        return blocks

    def _layer_blocks(self, layer):
        """The weight and the bias of a hooked layer as two blocks: a bias is a weight on a constant
        input 1, kept apart so that A keeps its BLAS-friendly width."""
        if not layer.inputs:
            raise RuntimeError(
                f"PerSampleGradients: layer {layer.name!r} recorded no forward pass: run the model inside the `with` block"
            )
        if len(layer.grads) != len(layer.inputs):
            raise RuntimeError(
                f"PerSampleGradients: layer {layer.name!r} received no output gradient: call loss.backward() inside "
                "the `with` block (and make sure the layer's output reaches the loss)"
            )
        if has_explicit_gradients(layer.module):
            return self._layer_norm_blocks(layer)
        pieces = [call_factors(layer.name, layer.module, layer.inputs[i], layer.grads[i]) for i in range(len(layer.inputs))]
        A = torch.cat([a for a, _ in pieces], 1) if len(pieces) > 1 else pieces[0][0]
        D = torch.cat([d for _, d in pieces], 1) if len(pieces) > 1 else pieces[0][1]
        B = self._agree_batch_size(layer, A.shape[0])
        check_finite(A, f"the inputs recorded at layer {layer.name!r}", "PerSampleGradients")
        check_finite(D, f"the output gradients recorded at layer {layer.name!r}", "PerSampleGradients")
        if self.loss_reduction == "mean":
            D = D * B
        blocks = []
        if layer.weight is not None:
            blocks.append(_Block(layer.weight, self.param_shapes[layer.weight], layer.name, A, D))
        if layer.bias is not None:  # sum_t D[b,t]^T 1 = (sum_t D[b,t])^T 1: one position suffices
            D_bias = D.sum(1, keepdim=True) if D.shape[1] > 1 else D
            blocks.append(_Block(layer.bias, self.param_shapes[layer.bias], layer.name, A.new_ones(A.shape[0], 1, 1), D_bias))
        return blocks

    def _agree_batch_size(self, layer, B):
        """Record the batch size of the first layer read; every other layer must have seen the same."""
        if self._batch_size is None:
            self._batch_size = B
        elif B != self._batch_size:
            raise ValueError(
                f"PerSampleGradients: layer {layer.name!r} saw batch size {B}, other layers {self._batch_size}: "
                "use one forward and one backward per `with` block"
            )
        return B

    def _layer_norm_blocks(self, layer):
        """LayerNorm's per-sample gradients, formed explicitly (B x normalized size) and kept as
        fallback-style blocks (D = 1)."""
        G_w, G_b = layer_norm_gradients(layer.module, layer.inputs, [layer.grads[i] for i in range(len(layer.inputs))])
        B = self._agree_batch_size(layer, G_w.shape[0])
        check_finite(G_w, f"the per-sample gradients at layer {layer.name!r}", "PerSampleGradients")
        if self.loss_reduction == "mean":
            G_w, G_b = G_w * B, G_b * B
        ones = G_w.new_ones(B, 1)
        blocks = []
        if layer.weight is not None:
            blocks.append(_Block(layer.weight, self.param_shapes[layer.weight], layer.name, G_w, ones))
        if layer.bias is not None:
            blocks.append(_Block(layer.bias, self.param_shapes[layer.bias], layer.name, G_b, ones))
        return blocks

    def _selected(self, layer):
        blocks = self._blocks()
        if layer is None:
            return blocks
        chosen = [b for b in blocks if b.layer == layer]
        if not chosen:
            raise ValueError(f"PerSampleGradients: layer {layer!r} is not among the hooked layers {self.layer_names}")
        return chosen

    @property
    def layer_names(self):
        """Names of the hooked modules (the ``layer=`` argument of the statistics)."""
        return [layer.name for layer in self._layers]

    @property
    def batch_size(self):
        return self._blocks()[0].A.shape[0]

    # -------------------------------------------------------------------------------- statistics
    def _block_stat(self, block, name):
        """One statistic of one block, from the cache that ``stats()`` fills, else from its own op."""
        cached = self._cache.get(("stats", block.name))
        if cached is not None:
            return cached[name]
        if name == "sq_norms":
            return ops.per_sample_sq_norms(block.A, block.D, check_finite=False)
        if name == "gram":
            return ops.per_sample_gram(block.A, block.D, check_finite=False)
        key = ("moments", block.name)
        if key not in self._cache:
            self._cache[key] = ops.per_sample_moments(block.A, block.D, check_finite=False)
        return self._cache[key][0 if name == "mean" else 1]

    def stats(self):
        """Squared norms (B,), Gram matrix (B, B), mean and variance (dicts) computed together: one pass
        per layer, which for sequence inputs (T > 1) builds each tile of per-sample gradients once.
        Later calls of sq_norms(), gram(), mean() and variance() reuse the results."""
        for b in self._blocks():
            if ("stats", b.name) not in self._cache:
                sq, gram, mean, var = ops.per_sample_stats(b.A, b.D, check_finite=False)
                self._cache[("stats", b.name)] = {"sq_norms": sq, "gram": gram, "mean": mean, "variance": var}
        return {"sq_norms": self.sq_norms(), "gram": self.gram(), "mean": self.mean(), "variance": self.variance()}

    def factors(self):
        """[(parameter name, A, D)]: the recorded factors of every parameter's per-sample gradients,
        G_b = sum_t D[b, t]^T A[b, t] (A, D of shape (B, T, cols) and (B, T, out), or (B, cols) and
        (B, out) for one position), scaled to per-sample losses as the statistics are."""
        return [(b.name, b.A, b.D) for b in self._blocks()]

    def sq_norms(self, layer=None):
        """(B,) squared norms ||g_b||^2 of the per-sample gradients over all hooked parameters (or one layer)."""
        return sum(self._block_stat(b, "sq_norms") for b in self._selected(layer))

    def gram(self, layer=None):
        """(B, B) Gram matrix <g_b, g_c> of the per-sample gradients."""
        return sum(self._block_stat(b, "gram") for b in self._selected(layer))

    def mean(self):
        """dict name -> batch mean of the per-sample gradients (the gradient of the mean loss)."""
        return {b.name: b.split(self._block_stat(b, "mean")) for b in self._blocks()}

    def variance(self, correction=0):
        """dict name -> per-element variance over the batch, sum_b (g_b - mean)^2 / (B - correction)."""
        B = self.batch_size
        if not 0 <= correction < B:
            raise ValueError(f"variance: correction must be in [0, B) = [0, {B}), got {correction}")
        scale = B / (B - correction)
        out = {b.name: b.split(self._block_stat(b, "variance")) for b in self._blocks()}
        return {n: v * scale for n, v in out.items()} if correction else out

    def _as_dict(self, vectors, blocks, op):
        """Normalise vectors (dict name -> (K, *shape), or flat (K, P) over the names) to (dict, K)."""
        names = [b.name for b in blocks]
        ref = blocks[0].A
        if isinstance(vectors, torch.Tensor):
            sizes = [int(torch.Size(self.param_shapes[n]).numel()) for n in names]
            if vectors.dim() != 2 or vectors.shape[1] != sum(sizes):
                raise ValueError(
                    f"{op}: flat vectors must have shape (K, {sum(sizes)}) over {names}, got {tuple(vectors.shape)}"
                )
            parts = torch.split(vectors, sizes, 1)
            vectors = {n: v.reshape(v.shape[0], *self.param_shapes[n]) for n, v in zip(names, parts)}
        elif not isinstance(vectors, dict):
            raise TypeError(f"{op}: vectors must be a dict name -> (K, *shape) tensor or a flat (K, P) tensor")
        missing = [n for n in names if n not in vectors]
        extra = [n for n in vectors if n not in names]
        if missing or extra:
            raise ValueError(f"{op}: vectors must have exactly the keys {names}; missing {missing}, unexpected {extra}")
        K = None
        for n in names:
            v = vectors[n]
            if not isinstance(v, torch.Tensor) or tuple(v.shape[1:]) != self.param_shapes[n]:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"{op}: vectors[{n!r}] must have shape (K, {', '.join(map(str, self.param_shapes[n]))}), got {got}"
                )
            if K is None:
                K = v.shape[0]
            elif v.shape[0] != K:
                raise ValueError(f"{op}: every vectors entry needs the same K, got {K} and {v.shape[0]} ({n!r})")
            if v.dtype != ref.dtype or v.device != ref.device:
                raise ValueError(f"{op}: vectors[{n!r}] must be {ref.dtype} on {ref.device}, got {v.dtype} on {v.device}")
        return vectors, K

    def project(self, vectors, layer=None):
        """(B, K) projections <g_b, v_k> for K vectors (dict name -> (K, *shape), or flat (K, P))."""
        blocks = self._selected(layer)
        vecs, K = self._as_dict(vectors, blocks, "project")
        return sum(ops.per_sample_project(b.A, b.D, b.directions(vecs, K), check_finite=False) for b in blocks)

    def weighted_sum(self, weights, layer=None):
        """dict name -> (K, *shape): sum_b weights[b, k] g_b for weights of shape (B, K)."""
        blocks = self._selected(layer)
        return {b.name: b.split(ops.per_sample_weighted_sum(b.A, b.D, weights, check_finite=False)) for b in blocks}

    def cov_matvec(self, vectors, layer=None):
        """C_1 v_k for K vectors, in the format given (dict or flat (K, P)); C_1 = (1/B) sum_b (g_b - mean)
        (g_b - mean)^T over all hooked parameters (or the block of one layer)."""
        blocks = self._selected(layer)
        vecs, K = self._as_dict(vectors, blocks, "cov_matvec")
        directions = [b.directions(vecs, K) for b in blocks]
        if len(blocks) == 1:
            res = ops.per_sample_cov_matvec(blocks[0].A, blocks[0].D, directions[0], check_finite=False)
            out = {blocks[0].name: blocks[0].split(res)}
        else:  # the centred projections couple the layers: block l gets (1/B) sum_b s_bk G_b^(l)
            s = sum(ops.per_sample_project(b.A, b.D, V, check_finite=False) for b, V in zip(blocks, directions))
            out = self.weighted_sum((s - s.mean(0)) / s.shape[0], layer)
        if isinstance(vectors, torch.Tensor):
            return torch.cat([out[b.name].reshape(K, -1) for b in blocks], 1)
        return out


@dataclass
class _Block:
    """The per-sample gradients of one parameter as G_b = sum_t D[b,t]^T A[b,t], an (out, cols) matrix:
    a weight (its trailing dims flattened into the columns), a bias (one column on a constant input 1),
    or a fallback parameter (D = 1, its per-sample gradients as the columns of A)."""

    name: str
    shape: tuple
    layer: str  # the hooked module's name, None for the fallback
    A: torch.Tensor
    D: torch.Tensor

    def split(self, mat):
        """(..., out, cols) in the parameter's shape (leading dims kept)."""
        return mat.reshape(*mat.shape[:-2], *self.shape)

    def directions(self, vectors, K):
        """(K, out, cols) directions from vectors name -> (K, *shape)."""
        return vectors[self.name].reshape(K, self.D.shape[-1], self.A.shape[-1])

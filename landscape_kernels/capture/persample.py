"""Per-sample gradient statistics of a model from one ordinary backward pass.

``PerSampleGradients`` hooks every module that holds a chosen parameter, records each call's inputs and
the gradient of the loss with respect to its output during one forward + backward, and turns them into
the per-sample gradients of the parameters with the per-layer rules (``capture.layers``: Linear,
transformers' Conv1D, Conv1d/2d/3d, Embedding and the normalisation layers as factors or small explicit
tensors; ``capture.sample_vjp``: nn.MultiheadAttention and any other module, exactly, by per-sample
vector-Jacobian products). The statistics then come from the fused ops, never holding the
batch x parameters tensor for the factor rules. Users add rules with ``register_per_sample_rule``.

Scale convention: every statistic is of the per-sample *loss* gradients g_b = grad l_b, whatever the
reduction of the batch loss. With ``loss_reduction="mean"`` (loss = (1/B) sum_b l_b) the recorded
output gradients are multiplied by B; with ``"sum"`` they are used as they are. ``variance()`` is the
population variance over the batch (the diagonal of C_1 in the conventions of docs/methods.md; ``correction=1`` gives
the unbiased one), ``cov_matvec`` applies C_1 (divide by the SGD batch size for the noise covariance).

Inside the ``with`` block a ``torch.compile``'d model runs eagerly (compiled code runs no module hooks),
so its statistics are those of the same model uncompiled.

A parameter used several times in one forward (a layer applied twice, a weight tied between two modules
such as GPT-2's input embedding and output layer) gets the exact sum over its uses. The per-sample
gradients are checked against the batch gradient autograd computed (in ``compute``, and after an
ordinary ``loss.backward()`` when ``.grad`` was empty before): a use no rule saw (a weight read outside
its module's forward) is an error, not a silent wrong result.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import ops
from ..kernels.checks import check_finite
from .fallback import whole_model_per_sample_gradients
from .layers import widen_shared_embedding
from .model import batch_size_of, call_model, model_output, tensors_in
from .rules import Call, Factors, Rule, rule_for
from .sample_vjp import generic_rule


@dataclass
class _Hooked:
    """A hooked module, its rule, the chosen parameters it uses (name relative to the module -> model
    name) and the calls one forward/backward recorded."""

    name: str
    module: nn.Module
    rule: Rule
    params: dict
    calls: list = field(default_factory=list)


class PerSampleGradients:
    """Context manager giving per-sample gradient statistics of ``model``'s parameters.

    Usage::

        ps = PerSampleGradients(model)            # every trainable parameter
        with ps:
            loss = F.cross_entropy(model(x), y)   # reduction="mean", as loss_reduction says
            loss.backward()
        ps.sq_norms(), ps.gram(), ps.variance(), ps.project(V), ps.cov_matvec(V)

    Args:
        model: the ``nn.Module``.
        layers: ``None`` (every trainable parameter) or a list of module names or modules whose own
            parameters are wanted (every use of them is then hooked, tied copies included).
        params: or a list of parameter names (as ``model.named_parameters()`` gives them).
        loss_reduction: ``"mean"`` or ``"sum"``: how the batch loss reduces the per-sample losses.
        fallback: ``"error"`` (a parameter no rule can serve raises a ``ValueError`` naming it) or
            ``"vmap"`` (the parameters of modules without a registered rule get chunked ``torch.func``
            per-sample gradients of the whole model; take the statistics through ``compute``).
        vmap_chunk_size: samples per ``torch.func`` call in the fallback.
        output_fn: for ``compute``: the tensor the loss is taken of (default: the output, its ``.logits``,
            or its first element; see ``capture.model.model_output``).
    """

    def __init__(self, model, layers=None, loss_reduction="mean", fallback="error", vmap_chunk_size=64,
                 params=None, output_fn=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerSampleGradients: model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"PerSampleGradients: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if fallback not in ("error", "vmap"):
            raise ValueError(f"PerSampleGradients: fallback must be 'error' or 'vmap', got {fallback!r}")
        if layers is not None and params is not None:
            raise ValueError("PerSampleGradients: pass layers or params, not both")
        self.model = model
        self.loss_reduction = loss_reduction
        self.fallback = fallback
        self.vmap_chunk_size = int(vmap_chunk_size)
        self.output_fn = output_fn
        named = dict(model.named_parameters())
        self.param_names = self._chosen_names(layers, params, named)
        self._hooked, self._fallback_params = self._resolve(set(self.param_names), named)
        self.param_shapes = {n: tuple(named[n].shape) for n in self.param_names}
        self.num_params = sum(named[n].numel() for n in self.param_names)
        self._handles = []
        self._fallback_grads = None  # (B, P_fallback) after compute()
        self._reference = {}  # name -> the batch gradient autograd computed, for the sum check
        self._batch_size = None
        self._forwards = 0
        self._backwards_repeated = False
        self._cache = {}

    # ----------------------------------------------------------------------------------- set-up
    def _chosen_names(self, layers, params, named):
        if params is not None:
            missing = [n for n in params if n not in named]
            if missing:
                raise ValueError(f"PerSampleGradients: params {missing} are not parameters of the model")
            wanted = {id(named[n]) for n in params}
        elif layers is None:
            wanted = {id(p) for p in named.values() if p.requires_grad}
        else:
            modules = dict(self.model.named_modules())
            by_id = {id(m): n for n, m in modules.items()}
            wanted = set()
            for item in layers:
                if isinstance(item, str):
                    if item not in modules:
                        raise ValueError(f"PerSampleGradients: layers names {item!r}, which is not a module of the model")
                    module = modules[item]
                elif isinstance(item, nn.Module) and id(item) in by_id:
                    module = item
                else:
                    raise ValueError(f"PerSampleGradients: layers must hold module names or modules of the model, got {item!r}")
                wanted |= {id(p) for p in module.parameters(recurse=False) if p.requires_grad}
        names = [n for n, p in named.items() if id(p) in wanted and p.requires_grad]
        if not names:
            raise ValueError("PerSampleGradients: the model has no trainable parameters in the chosen layers")
        return names

    def _resolve(self, chosen, named):
        """The hooked modules (a rule each) and the parameters left to the vmap fallback."""
        canonical = {}
        for n, p in named.items():
            canonical.setdefault(id(p), n)
        hooked, fallback, unsupported, covered = [], {}, [], set()
        for name, module in self.model.named_modules():
            if id(module) in covered:
                continue
            rule = rule_for(module)
            recurse = rule is not None and rule.covers_children
            if recurse:
                covered |= {id(m) for m in module.modules()}
            own = {rel: canonical[id(p)] for rel, p in module.named_parameters(recurse=recurse, remove_duplicate=False)
                   if id(p) in canonical and canonical[id(p)] in chosen}
            if not own:
                continue
            reason = rule.check(module) if rule is not None and rule.check is not None else None
            if rule is None and self.fallback == "error":
                rule = Rule(generic_rule)  # it refuses, when it runs, a module it cannot re-run faithfully
            if rule is not None and reason is None:
                hooked.append(_Hooked(name, module, rule, own))
            elif self.fallback == "vmap":
                fallback.update({n: named[n] for n in own.values()})
            else:
                unsupported.append(f"{name or '<model>'} ({reason}: {', '.join(own.values())})")
        if unsupported:
            raise ValueError(
                "PerSampleGradients: no per-sample rule for the parameters of " + "; ".join(unsupported)
                + ". Pass layers=[...] or params=[...] to leave them out, freeze them (requires_grad=False), "
                "or use fallback='vmap' with compute(loss_fn, inputs, targets)."
            )
        fallback_ids = {id(p) for p in fallback.values()}
        for h in hooked:  # a tied parameter with one use in the fallback is handled there entirely
            h.params = {rel: n for rel, n in h.params.items() if id(named[n]) not in fallback_ids}
        return [h for h in hooked if h.params], fallback

    def __enter__(self):
        if self._handles:
            raise RuntimeError("PerSampleGradients: this object is already recording (a `with` block inside another, "
                               "or compute() inside a `with` block); use one `with` block, or compute() alone")
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    "PerSampleGradients: BatchNorm in training mode mixes the samples of a batch, so per-sample "
                    "gradients are not defined; call model.eval() first"
                )
        params = dict(self.model.named_parameters())
        self._empty_grads = [n for n in self.param_names if params[n].grad is None]
        for h in self._hooked:
            h.calls.clear()
            self._handles.append(h.module.register_forward_hook(self._forward_hook(h), with_kwargs=True))
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        # a torch.compile'd model (or forward) runs eagerly inside the block: compiled code runs no module hooks
        self._stance = torch.compiler.set_stance("force_eager")
        self._cache.clear()
        self._reference = {}
        self._fallback_grads = None
        self._batch_size = None
        self._model_batch = None
        self._forwards = 0
        self._backwards_repeated = False
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stance.__exit__(None, None, None)
        if exc[0] is None:
            params = dict(self.model.named_parameters())
            for n in self._empty_grads:  # an ordinary loss.backward() filled .grad: the sum check's reference
                if params[n].grad is not None and n not in self._reference:
                    self._reference[n] = params[n].grad.detach().clone()
        return False

    def _repeated_backward(self):
        self._backwards_repeated = True

    def _model_pre_hook(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self._forwards += 1
            try:
                self._model_batch = batch_size_of(args if args else kwargs)
            except TypeError:
                self._model_batch = None

    def _forward_hook(self, hooked):
        def hook(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return None
            B = self._model_batch
            replaced = None
            if hooked.rule.widen_shared and B is not None and isinstance(output, torch.Tensor) and args:
                replaced = widen_shared_embedding(args[0], output, B)
                output = output if replaced is None else replaced
            tensors = tensors_in(output)
            if not any(t.requires_grad for t in tensors):
                return replaced
            call = Call(tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()},
                        [(t.shape, t.dtype, t.device) for t in tensors], [None] * len(tensors), B)
            hooked.calls.append(call)
            for i, t in enumerate(tensors):
                if t.requires_grad:
                    t.register_hook(_storer(call, i, self._repeated_backward))
            return replaced

        return hook

    # ---------------------------------------------------------------------------- capture helper
    def compute(self, loss_fn, inputs, targets):
        """Run forward and backward of ``loss_fn(output_fn(model(inputs)), targets)`` under the hooks
        (gradients are taken with ``torch.autograd.grad``, so ``.grad`` is left alone) and, with
        ``fallback="vmap"``, the per-sample gradients of the fallback parameters. ``inputs``: a tensor,
        a tuple (``model(*inputs)``) or a dict (``model(**inputs)``). Returns the batch loss."""
        named = dict(self.model.named_parameters())
        params = [named[n] for n in self.param_names]
        with self:
            loss = loss_fn(model_output(call_model(self.model, inputs), self.output_fn), targets)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        self._reference = {n: g for n, g in zip(self.param_names, grads) if g is not None}
        if self._fallback_params:
            self._fallback_grads = self._vmap_gradients(loss_fn, inputs, targets)
        return loss.detach()

    def batch_gradient(self, name):
        """The gradient of the batch loss that autograd computed for parameter ``name`` in ``compute`` (or
        the ``.grad`` an ordinary backward filled), None where it did not reach the loss."""
        if name not in self.param_shapes:
            raise ValueError(f"batch_gradient: {name!r} is not among the parameters {self.param_names}")
        return self._reference.get(name)

    def _vmap_gradients(self, loss_fn, inputs, targets):
        return whole_model_per_sample_gradients(self.model, loss_fn, inputs, targets, self._fallback_params,
                                                self.output_fn, self.vmap_chunk_size)

    # ------------------------------------------------------------------- recorded parameter blocks
    def _blocks(self):
        """One ``_Block`` per chosen parameter (model order): the sum of its uses' contributions, or its
        fallback per-sample gradients."""
        if "blocks" in self._cache:
            return self._cache["blocks"]
        if self._handles:
            raise RuntimeError("PerSampleGradients: statistics are available after the `with` block has ended")
        if self._forwards > 1:
            raise RuntimeError(f"PerSampleGradients: the model ran {self._forwards} forward passes in one `with` block; "
                               "the recorded uses would be joined as if one forward had made them all. Use one forward "
                               "and one backward per `with` block (or compute())")
        if self._backwards_repeated:
            raise RuntimeError("PerSampleGradients: two backward passes ran through one forward in one `with` block "
                               "(backward(retain_graph=True), then again); only the last one's output gradients "
                               "would be kept. Use one forward and one backward per `with` block (or compute())")
        contributions = self._contributions()
        fallback = self._fallback_blocks()
        blocks = []
        for name in self.param_names:
            if name in fallback:
                blocks.append(fallback[name])
            elif name in contributions:
                layers, parts = contributions[name]
                blocks.append(self._combine(name, layers, parts))
        self._check_against_batch_gradient(blocks)
        self._cache["blocks"] = blocks
        return blocks

    def _contributions(self):
        """name -> (hooked module names, [Factors or (B, *shape) tensors]) over every recorded call."""
        out = {}
        for h in self._hooked:
            for call in h.calls:
                if len(call.grads) and all(g is None for g in call.grads):
                    raise RuntimeError(
                        f"PerSampleGradients: layer {h.name!r} received no output gradient: call loss.backward() "
                        "inside the `with` block (and make sure the layer's output reaches the loss)")
                with torch.no_grad():  # a rule's arithmetic on the module's parameters records no graph
                    given = h.rule.fn(h.module, call)
                for rel, model_name in h.params.items():
                    if rel not in given:
                        raise ValueError(f"PerSampleGradients: the rule for {type(h.module).__name__} ({h.name!r}) gave "
                                         f"no per-sample gradient for its parameter {rel!r}")
                    layers, parts = out.setdefault(model_name, ([], []))
                    if h.name not in layers:
                        layers.append(h.name)
                    parts.append(given[rel])
        missing = [n for n in self.param_names if n not in out and n not in self._fallback_params]
        if missing:
            users = [h.name for h in self._hooked if set(h.params.values()) & set(missing)]
            raise RuntimeError(f"PerSampleGradients: the modules {users} holding {missing} recorded no forward pass: run "
                               "the model inside the `with` block")
        return out

    def _combine(self, name, layers, parts):
        """One block from the contributions of every use of a parameter: factors of one layout joined along
        the positions (G_b sums over them), anything else summed as explicit per-sample gradients."""
        shape = self.param_shapes[name]
        factors = [Factors(*(t.unsqueeze(1) if t.dim() == 2 else t for t in p)) for p in parts if isinstance(p, Factors)]
        explicit = [p for p in parts if not isinstance(p, Factors)]
        widths = {(f.A.shape[-1], f.D.shape[-1]) for f in factors}
        for p in factors + explicit:
            B = self._agree_batch_size(layers[0], (p.A if isinstance(p, Factors) else p).shape[0])
        scale = B if self.loss_reduction == "mean" else 1
        if not explicit and len(widths) == 1:
            A = torch.cat([f.A for f in factors], 1) if len(factors) > 1 else factors[0].A
            D = torch.cat([f.D for f in factors], 1) if len(factors) > 1 else factors[0].D
            check_finite(A, f"the inputs recorded at layer {layers[0]!r}", "PerSampleGradients")
            check_finite(D, f"the output gradients recorded at layer {layers[0]!r}", "PerSampleGradients")
            return _Block(name, shape, layers, A, D * scale)
        G = sum(torch.einsum("bto,bti->boi", f.D, f.A).reshape(B, -1) for f in factors) if factors else 0
        G = G + sum(e.reshape(B, -1) for e in explicit)
        check_finite(G, f"the per-sample gradients at layer {layers[0]!r}", "PerSampleGradients")
        return _Block(name, shape, layers, G * scale, G.new_ones(B, 1))

    def _fallback_blocks(self):
        if not self._fallback_params:
            return {}
        if self._fallback_grads is None:
            raise RuntimeError(
                "PerSampleGradients: parameters " + ", ".join(self._fallback_params) + " use the vmap fallback, "
                "which needs the loss: take the statistics through compute(loss_fn, inputs, targets)"
            )
        # per-sample gradients as A with D = 1 (G_b = 1 x g_b), one block per parameter
        G = self._fallback_grads
        ones = G.new_ones(G.shape[0], 1)
        out, start = {}, 0
        for name in self._fallback_params:
            size = int(torch.Size(self.param_shapes[name]).numel())
            out[name] = _Block(name, self.param_shapes[name], [], G[:, start : start + size], ones)
            self._agree_batch_size("the vmap fallback", G.shape[0])
            start += size
        return out

    def _agree_batch_size(self, layer, B):
        """Record the batch size of the first layer read; every other layer must have seen the same."""
        if self._batch_size is None:
            self._batch_size = B
        elif B != self._batch_size:
            raise ValueError(
                f"PerSampleGradients: layer {layer!r} saw batch size {B}, other layers {self._batch_size}: "
                "use one forward and one backward per `with` block (an embedding of position ids shared by the batch is "
                "widened to the batch only inside the model's own forward; elsewhere give it batched indices, e.g. "
                "positions.expand(B, T))"
            )
        return B

    def _check_against_batch_gradient(self, blocks):
        """The per-sample gradients must add up to the batch gradient autograd computed: a use of a
        parameter that no rule saw would otherwise give silently wrong statistics.

        Compared through random bilinear probes u^T (sum_b G_b) w = sum_{b,t} (D_bt . u)(A_bt . w), whose
        mean square is the squared Frobenius norm of the difference: O(B T (in + out)) per probe instead of
        the GEMM that forming sum_b G_b would cost (as much as the statistics of a wide layer)."""
        bad = []
        for b in blocks:
            ref = self._reference_mean(b)
            if ref is None:
                continue
            D, A = (t.unsqueeze(1) if t.dim() == 2 else t for t in (b.D, b.A))
            gen = torch.Generator(device=A.device).manual_seed(0)
            u = torch.randn(D.shape[-1], _CHECK_PROBES, dtype=A.dtype, device=A.device, generator=gen)
            w = torch.randn(A.shape[-1], _CHECK_PROBES, dtype=A.dtype, device=A.device, generator=gen)
            mean = ((D @ u) * (A @ w)).sum((0, 1)) / A.shape[0]
            tol = 1e-6 if A.dtype == torch.float64 else 2e-3
            diff = float((mean - ((u.t() @ ref) * w.t()).sum(1)).double().square().mean().sqrt())
            size = float(ref.norm())
            if diff > tol * size + 1e-12 * max(1.0, float(mean.detach().abs().max())):
                bad.append(f"{b.name} (relative difference about {diff / max(size, 1e-300):.2g})")
        if bad:
            raise RuntimeError(
                "PerSampleGradients: the per-sample gradients do not add up to the batch gradient autograd computed for "
                + ", ".join(bad) + f". Either loss_reduction={self.loss_reduction!r} does not match the loss, or a "
                "parameter is used where no hooked module saw it (read outside its module's forward, e.g. "
                "F.linear(x, layer.weight)); register a rule for the module that uses it (docs/guide/per-sample.md) "
                "or use fallback='vmap' with compute(...)")

    def _selected(self, layer):
        blocks = self._blocks()
        if layer is None:
            return blocks
        chosen = [b for b in blocks if layer in b.layers]
        if not chosen:
            raise ValueError(f"PerSampleGradients: layer {layer!r} is not among the hooked layers {self.layer_names}")
        return chosen

    @property
    def layer_names(self):
        """Names of the hooked modules (the ``layer=`` argument of the statistics)."""
        return [h.name for h in self._hooked]

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
                centre = self._centre(b)
                if centre is None:
                    sq, gram, mean, var = ops.per_sample_stats(b.A, b.D, check_finite=False)
                else:
                    sq, gram, mean, var = ops.per_sample_stats_about(b.A, b.D, centre, check_finite=False)
                self._cache[("stats", b.name)] = {"sq_norms": sq, "gram": gram, "mean": mean, "variance": var}
        return {"sq_norms": self.sq_norms(), "gram": self.gram(), "mean": self.mean(), "variance": self.variance()}

    def _reference_mean(self, block):
        """The batch gradient autograd computed for the block's parameter, as the (out, in) batch mean of
        its per-sample gradients in their dtype (None where autograd computed none)."""
        ref = self._reference.get(block.name)
        if ref is None:
            return None
        mean = ref.detach().reshape(block.D.shape[-1], block.A.shape[-1]).to(block.A.dtype)
        return (mean if self.loss_reduction == "mean" else mean / block.A.shape[0]).contiguous()

    def _centre(self, block):
        """For blocks of one position per sample, the mean autograd gave: their variance pass then also
        gives the mean (a GEMM saved). None where there is none or the block has several positions."""
        if block.A.dim() == 3 and block.A.shape[1] != 1:
            return None
        return self._reference_mean(block)

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
    layers: list  # the hooked modules that use it (empty for the fallback)
    A: torch.Tensor
    D: torch.Tensor

    def split(self, mat):
        """(..., out, cols) in the parameter's shape (leading dims kept)."""
        return mat.reshape(*mat.shape[:-2], *self.shape)

    def directions(self, vectors, K):
        """(K, out, cols) directions from vectors name -> (K, *shape)."""
        return vectors[self.name].reshape(K, self.D.shape[-1], self.A.shape[-1])


_CHECK_PROBES = 8  # probe pairs of the batch-gradient check (a missed use shows in every one)


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _storer(call, index, on_repeat):
    def store(grad):
        if call.grads[index] is not None:  # a second backward through the same forward
            on_repeat()
        call.grads[index] = grad.detach()

    return store

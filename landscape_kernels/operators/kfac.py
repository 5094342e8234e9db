"""KFAC and EKFAC: block-diagonal Kronecker-factored approximations of the GGN / Fisher of a model's mean
cross-entropy or squared error, from the layer inputs and output gradients of one data pass.

KFAC (Martens & Grosse 2015; convolutions: Grosse & Martens 2016; layers with weight sharing, the
expand and reduce conventions: Eschenhagen et al. 2023) gives each weight the block
``gradient factor (x) input factor`` (for a weight stored (in, out), as transformers' ``Conv1D`` does,
the other order) and each bias ``gradient factor`` alone (weight and bias are separate blocks, as in
curvlinops' default). For a layer called on T positions per sample (a sequence, the output positions
of a convolution) with inputs a_{n,t} and backpropagated output gradients b_{n,t,k} (k over the columns
of the output-Hessian square root, see ``operators.loss_hessian``):

- ``expand`` (the default; positions as extra samples): input factor (1 / (N T)) sum_{n,t} a a^T,
  gradient factor sum over batches of (B / N) sum_{n,t,k} b b^T;
- ``reduce``: input factor (1 / N) sum_n abar abar^T with abar_n the mean over positions, gradient
  factor sum over batches of (B / N) sum_{n,k} btilde btilde^T with btilde_n the sum over positions.

Both are exact for a single linear layer on (B, features) inputs under the squared error (and for one
sample under cross-entropy). ``fisher_type``: ``"type-2"`` (the exact output Hessian: one backward per
class, every position at once), ``"mc"`` (``mc_samples`` labels drawn from the model per sample, the
Monte-Carlo Fisher) or ``"empirical"`` (the true labels: the empirical Fisher, ``FisherOperator``).

EKFAC (George et al. 2018) keeps KFAC's eigenbasis Q_G (x) Q_A per block and refits its eigenvalues to
the second moments of the exact per-sample gradients in that basis (a second data pass, through the
fused per-sample moment kernel; type-2 columns one output position at a time there), which is the closest matrix to the exact block in Frobenius norm among
those diagonal in that basis, so never further from it than KFAC.

Supported layers: ``nn.Linear`` (inputs of any rank, batch first), ``nn.Conv1d/2d/3d`` with
``groups=1`` (input patches), transformers' ``Conv1D``. A layer used several times in one forward
contributes each use's positions. ``kfac_parameters(model)`` lists the parameters KFAC covers.
"""
import copy
import math

import torch

from ..capture.model import batch_size_of
from .layer_records import LayerRecording, SquaredGradientSums, factor_layers, is_transformers_conv1d
from .loss_hessian import check_loss, empirical_column, exact_columns, mean_loss, monte_carlo_columns
from .model import ModelOperator

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROXIMATIONS = ("expand", "reduce")


def kfac_parameters(model, params=None):
    """The names of the trainable parameters (of ``params``, or all) that KFAC covers: weights and biases of
    Linear, ConvNd (groups=1) and transformers' Conv1D layers."""
    chosen = params if params is not None else [n for n, p in model.named_parameters() if p.requires_grad]
    layers, _ = factor_layers(model, chosen)
    covered = {n for _, names in layers.values() for n in names.values()}
    return [n for n in chosen if n in covered]


def _with_ones(rows):
    """(B, T, d) rows with a constant 1 appended: (B, T, d + 1)."""
    return torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], 2)


class KroneckerBlock:
    """One parameter's block kron(left, right), acting on the parameter as a (rows, cols) matrix V by
    left V right; its eigenbasis Q_left (x) Q_right and eigenvalues (KFAC: the products of the factors'
    eigenvalues; EKFAC: ``refit``, a (rows, cols) tensor). ``sides`` says what each factor is built from:
    "gradient", "input" or "one" (a bias's constant input)."""

    def __init__(self, names, left, right, sides):
        self.names, self.left, self.right, self.sides = tuple(names), left, right, sides
        self.refit = None
        self._eigen = None

    def gather(self, parts):
        """The block's (K, rows, cols) matrix from its parameters' (K, *shape) directions: a weight alone, a
        bias alone, or a weight with its bias as an extra column (an extra row for a weight stored (in, out))."""
        K = parts[0].shape[0]
        if len(parts) == 1:
            return parts[0].reshape(K, self.left.shape[0], self.right.shape[0])
        weight, bias = parts
        if self.sides[0] == "gradient":  # (out, in + 1)
            return torch.cat([weight.reshape(K, weight.shape[1], -1), bias.reshape(K, -1, 1)], 2)
        return torch.cat([weight, bias.reshape(K, 1, -1)], 1)  # (in + 1, out)

    def scatter(self, M, parts):
        """The inverse of ``gather``: the block's parameters' (K, *shape) pieces of M."""
        if len(parts) == 1:
            return [M.reshape(parts[0].shape)]
        weight, bias = parts
        if self.sides[0] == "gradient":
            return [M[:, :, :-1].reshape(weight.shape), M[:, :, -1].reshape(bias.shape)]
        return [M[:, :-1].reshape(weight.shape), M[:, -1].reshape(bias.shape)]

    def eigen(self):
        """(lambda_left, Q_left, lambda_right, Q_right), computed once."""
        if self._eigen is None:
            ll, Ql = torch.linalg.eigh(self.left)
            lr, Qr = torch.linalg.eigh(self.right)
            self._eigen = (ll, Ql, lr, Qr)
        return self._eigen

    def eigenvalues(self):
        """(rows, cols) eigenvalues in the basis Q_left (x) Q_right."""
        if self.refit is not None:
            return self.refit
        ll, _, lr, _ = self.eigen()
        return ll[:, None] * lr[None, :]

    def apply(self, V, damping):
        """(block + damping I) V for V of shape (K, rows, cols)."""
        if self.refit is None:
            return self.left @ V @ self.right + damping * V
        return self.spectral_apply(V, lambda lam: lam + damping)

    def spectral_apply(self, V, fn):
        """Q diag(fn(eigenvalues)) Q^T V."""
        _, Ql, _, Qr = self.eigen()
        return Ql @ ((Ql.T @ V @ Qr) * fn(self.eigenvalues())) @ Qr.T

    def trace(self):
        return float(self.eigenvalues().sum()) if self.refit is not None else float(self.left.trace() * self.right.trace())


class KFACOperator(ModelOperator):
    """KFAC approximation of the GGN / Fisher of the mean ``loss`` (see the module docstring), with the
    operator interface (``matmat``, ``to_scipy()``; Lanczos, SLQ and the trace estimators take it) and
    ``damping`` added to every eigenvalue.

    Beyond products: ``inverse_matmat(V)`` ((A + damping I)^{-1} V, exactly, from the factors'
    eigendecompositions), ``eigenvalues()`` (all P of them, largest first), ``trace()``, ``blocks``
    (name -> ``KroneckerBlock``: the factors ``left``, ``right``) and ``as_parameter_dict``.
    """

    column_chunk = None  # Kronecker products take every column at once
    refit_eigenvalues = False

    def __init__(self, model, data, loss="cross_entropy", fisher_type="type-2", mc_samples=1, kfac_approx="expand",
                 damping=0.0, separate_weight_and_bias=True, params=None, batch_size=None, output_fn=None, seed=0):
        check_loss(loss)
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if kfac_approx not in KFAC_APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}")
        if not isinstance(mc_samples, int) or mc_samples < 1 or (mc_samples != 1 and fisher_type != "mc"):
            raise ValueError(f"mc_samples must be an int >= 1 (and 1 unless fisher_type='mc'), got {mc_samples!r}")
        if not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        super().__init__(model, mean_loss(loss), data, params, batch_size, output_fn)
        self.loss, self.fisher_type, self.mc_samples = loss, fisher_type, mc_samples
        self.kfac_approx, self.damping, self.seed = kfac_approx, float(damping), seed
        self.separate_weight_and_bias = bool(separate_weight_and_bias)
        self.layers = self._layers()
        self.blocks = self._factor_pass()
        if self.refit_eigenvalues:
            self._refit_pass()

    # ------------------------------------------------------------------------------- set-up
    def _layers(self):
        """{module name: (module, {"weight"/"bias": model parameter name})} for the chosen parameters."""
        layers, uncovered = factor_layers(self.model, self.param_names)
        if uncovered:
            raise ValueError(f"{type(self).__name__}: KFAC covers Linear, ConvNd (groups=1) and transformers' Conv1D "
                             f"weights and biases, not {', '.join(f'{n} ({why})' for n, why in uncovered)}; pass "
                             "params=kfac_parameters(model) (or a list of the covered names)")
        return layers

    def _columns(self, output, targets, generator, per_position):
        if self.fisher_type == "type-2":
            return exact_columns(self.loss, output, per_position=per_position)
        if self.fisher_type == "mc":
            return monte_carlo_columns(self.loss, output, self.mc_samples, generator)
        return [empirical_column(self.loss, output, targets)]

    def _passes(self, per_position=False):
        """For every batch: (B, {layer: input rows (B, T, in)}, iterator over columns of
        {layer: output-gradient rows (B, T, out)}), the T positions of every use of a layer joined.
        ``per_position``: type-2 columns one output position at a time (see ``exact_columns``)."""
        generator = torch.Generator().manual_seed(self.seed)  # the same draws in every pass
        modules = {name: module for name, (module, _) in self.layers.items()}
        for x, y in self.batches:
            B = batch_size_of(x)
            with self.eval_mode(), torch.enable_grad(), LayerRecording(modules, B) as recording:
                output = self.output(None, x)
            recording.check_ran(type(self).__name__)
            columns = self._columns(output, y, generator, per_position)
            yield B, recording.input_rows(), recording.gradient_rows(output, columns)

    # ----------------------------------------------------------------------------- the factors
    def _factor_pass(self):
        inputs = {n: 0.0 for n in self.layers}
        gradients = {n: 0.0 for n in self.layers}
        for B, a_rows, columns in self._passes():
            for n, a in a_rows.items():
                if self._joint(n):
                    a = _with_ones(a)
                if self.kfac_approx == "expand":
                    flat = a.reshape(-1, a.shape[-1])
                    inputs[n] = inputs[n] + flat.T @ flat / (self.num_samples * a.shape[1])
                else:
                    mean = a.mean(1)
                    inputs[n] = inputs[n] + mean.T @ mean / self.num_samples
            for g_rows in columns:
                for n, g in g_rows.items():
                    g = g.reshape(-1, g.shape[-1]) if self.kfac_approx == "expand" else g.sum(1)
                    gradients[n] = gradients[n] + (g.T @ g) * (B / self.num_samples)
        bad = [layer for layer in self.layers
               if not (bool(torch.isfinite(inputs[layer]).all()) and bool(torch.isfinite(gradients[layer]).all()))]
        if bad:
            raise ValueError(f"{type(self).__name__}: the Kronecker factors of the layers {bad} are not finite: the "
                             "model's inputs, outputs or output gradients there hold NaN or Inf")
        blocks = {}
        one = torch.ones(1, 1, dtype=self.dtype, device=self.device)
        for layer, (module, names) in self.layers.items():
            A, G = inputs[layer], gradients[layer]

            def weight_block(members, side):  # transformers' Conv1D stores the weight (in, out)
                if is_transformers_conv1d(module):
                    return KroneckerBlock(members, A, G, (side, "gradient"))
                return KroneckerBlock(members, G, A, ("gradient", side))

            if self._joint(layer):
                blocks[names["weight"]] = blocks[names["bias"]] = weight_block([names["weight"], names["bias"]],
                                                                                 "input+1")
                continue
            if "weight" in names:
                blocks[names["weight"]] = weight_block([names["weight"]], "input")
            if "bias" in names:
                blocks[names["bias"]] = KroneckerBlock([names["bias"]], G, one, ("gradient", "one"))
        return blocks

    def _joint(self, layer):
        """Whether the layer's weight and bias share one block (an input with a constant 1 appended)."""
        return not self.separate_weight_and_bias and len(self.layers[layer][1]) == 2

    def _refit_pass(self):
        """EKFAC's eigenvalues: (B / N) sum over batches, columns and samples of the squared per-sample
        gradients in each block's eigenbasis, through the fused per-sample moments. With type-2 columns on
        outputs with positions, each column covers one position (T x C backward passes per batch): a
        column over every position at once would add the products of different positions, which the GGN
        does not have (Monte-Carlo labels, drawn independently per position, average them away)."""
        by_layer = {layer: self._layer_blocks(layer) for layer in self.layers}
        refit = {id(b): 0.0 for b in self.unique_blocks()}
        for B, a_rows, columns in self._passes(per_position=True):
            # per block: its input side rotated once per batch, the gradient side per column
            sums = {}
            for layer, blocks in by_layer.items():
                for block in blocks:
                    grad_side = 0 if block.sides[0] == "gradient" else 1
                    kind = block.sides[1 - grad_side]
                    rows = None if kind == "one" else a_rows[layer] if kind == "input" else _with_ones(a_rows[layer])
                    rotated = None if rows is None else rows @ block.eigen()[3 - 2 * grad_side]
                    sums[id(block)] = SquaredGradientSums(rotated, transposed=grad_side == 1)
            for g_rows in columns:
                for layer, blocks in by_layer.items():
                    for block in blocks:
                        grad_side = 0 if block.sides[0] == "gradient" else 1
                        sums[id(block)].add(g_rows[layer] @ block.eigen()[1 + 2 * grad_side])
            for block in self.unique_blocks():
                acc = sums[id(block)]
                part = acc.bias()[:, None] if "one" in block.sides else acc.weight()
                refit[id(block)] = refit[id(block)] + part * (B / self.num_samples)
        for block in self.unique_blocks():
            block.refit = refit[id(block)]

    def _layer_blocks(self, layer):
        """The layer's blocks, each once (its weight and bias may share one)."""
        return list({id(self.blocks[n]): self.blocks[n] for n in self.layers[layer][1].values()}.values())

    # ------------------------------------------------------------------------------ the operator
    def unique_blocks(self):
        """The blocks in parameter order, each once (a weight and its bias may share one)."""
        return list({id(self.blocks[n]): self.blocks[n] for n in self.param_names}.values())

    def _blockwise(self, V, fn):
        parts = dict(zip(self.param_names, self.unflatten(V)))
        out = {}
        for block in self.unique_blocks():
            mine = [parts[n] for n in block.names]
            out.update(zip(block.names, block.scatter(fn(block, block.gather(mine)), mine)))
        return self.flatten([out[n] for n in self.param_names])

    def _matmat(self, V):
        return self._blockwise(V, lambda block, M: block.apply(M, self.damping))

    def inverse_matmat(self, V, damping=None):
        """(A + damping I)^{-1} V for V of shape (P, K), block by block from the eigendecompositions
        (``damping`` defaults to the operator's); every damped eigenvalue must be positive."""
        self.check_input(V)
        damping = self.damping if damping is None else float(damping)
        smallest = min(float(b.eigenvalues().min()) for b in self.unique_blocks()) + damping
        if not smallest > 0:
            raise ValueError(f"{type(self).__name__}.inverse_matmat: the damped approximation is singular (smallest "
                             f"eigenvalue {smallest:.3g}); pass damping > 0")
        return self._blockwise(V, lambda block, M: block.spectral_apply(M, lambda lam: 1.0 / (lam + damping)))

    def eigenvalues(self):
        """All P eigenvalues of the block-diagonal approximation (damping included), largest first."""
        lam = torch.cat([b.eigenvalues().reshape(-1) for b in self.unique_blocks()]) + self.damping
        return lam.sort(descending=True).values

    def trace(self):
        """tr of the approximation (damping included), from the factors."""
        return sum(b.trace() for b in self.unique_blocks()) + self.damping * self.shape[0]


class EKFACOperator(KFACOperator):
    """EKFAC (George et al. 2018): KFAC's eigenbasis with eigenvalues refitted to the exact per-sample
    gradients (a second data pass); the same arguments and methods as ``KFACOperator``."""

    refit_eigenvalues = True

    @classmethod
    def from_kfac(cls, kfac):
        """EKFAC on the factors an existing ``KFACOperator`` computed: only the refit pass runs (the same
        data and settings; ``kfac`` itself is left as it is)."""
        if not isinstance(kfac, KFACOperator) or isinstance(kfac, EKFACOperator):
            raise TypeError(f"EKFACOperator.from_kfac: kfac must be a KFACOperator, got {type(kfac).__name__}")
        op = copy.copy(kfac)
        op.__class__ = cls
        fresh = {}
        for block in kfac.unique_blocks():
            fresh[id(block)] = KroneckerBlock(block.names, block.left, block.right, block.sides)
            fresh[id(block)]._eigen = block.eigen()  # the same factors: the same eigendecompositions
        op.blocks = {n: fresh[id(b)] for n, b in kfac.blocks.items()}
        op._refit_pass()
        return op

"""Loss profiles along directions and the flatness of Feng & Tu 2021.

``loss_profiles`` evaluates L(theta0 + delta * d_k) for K directions and G offsets, many points per
pass over the data: the chosen parameters are stacked for M points and the model runs once for all of
them (``torch.func.functional_call`` under ``vmap``). When only the weight of one ``nn.Linear`` inside
an ``nn.Sequential`` moves (Feng & Tu's setting: W2 only), a fast path runs the layers before it once
per batch, forms the layer's output for any point as z0 + delta * (a d_k^T) and runs only the layers
after it. The model itself is never modified; it is put in eval mode and restored.

``flatness`` is Feng & Tu's (2021) definition exactly: per direction and side, the offset where ln L - ln L0 reaches
``threshold`` (1: the loss is e * L0), bracketed in steps of ``step`` up to ``cap`` (then reported as
saturated, at ``cap``) and bisected to ``tol``; all directions and both sides advance together.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..capture.model import as_batches, batch_size_of, call_model, chosen_parameters, eval_mode, model_output, slice_batch
from ..kernels import ops
from ..kernels.checks import all_finite
from ..operators.rop import loss_kind


def _flat_directions(directions, names, shapes, sizes, P):
    if isinstance(directions, dict):
        missing = [n for n in names if n not in directions]
        if missing or set(directions) - set(names):
            raise ValueError(f"directions: the dict must have exactly the keys {names}, got {list(directions)}")
        parts = []
        for n, s in zip(names, shapes):
            d = directions[n]
            if d.dim() != len(s) + 1 or tuple(d.shape[1:]) != tuple(s):
                raise ValueError(f"directions[{n!r}] must have shape (K, {', '.join(map(str, s))}), got {tuple(d.shape)}")
            parts.append(d.reshape(d.shape[0], -1))
        if len({p.shape[0] for p in parts}) != 1:
            raise ValueError("directions: every entry must hold the same number K of directions")
        directions = torch.cat(parts, 1)
    if not isinstance(directions, torch.Tensor) or directions.dim() != 2 or directions.shape[1] != P:
        got = tuple(directions.shape) if isinstance(directions, torch.Tensor) else type(directions).__name__
        raise ValueError(f"directions must have shape (K, P) = (K, {P}) for the chosen parameters {names}, got {got}")
    if directions.shape[0] == 0:
        raise ValueError("directions: no directions (K = 0)")
    if not all_finite(directions):
        raise ValueError("directions contain NaN/Inf")
    return directions


def _activation_numel_per_sample(model, x):
    """Elements of every leaf module's output for the first sample of ``x``: a conservative measure of
    what one evaluation point holds in memory per data row (all layers counted as alive at once)."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())] or [model]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            call_model(model, slice_batch(x, 0, 1))
    finally:
        for h in hooks:
            h.remove()
    return max(total[0], 1)


class LossEvaluator:
    """Mean loss over a fixed dataset at theta0 + delta_m * d_{k_m} for lists of (k_m, delta_m).
    ``points_per_pass`` None: as many points per pass as ``memory_budget`` bytes of temporaries allow
    (at most 256). The default budget, 64 MiB, keeps a CPU pass cache- and allocator-friendly (larger
    passes ran slower here); on a GPU a larger budget pays."""

    MAX_POINTS_PER_PASS = 256
    ROW_BLOCK = 8192
    FAST_POINTS_PER_PASS = 64  # the fast path's default: its temporaries are bounded by its row tiles
    TILE_ELEMENTS = 2**21  # fast path: elements of one tile's moved outputs (8 MiB in float32)
    MIN_TILE_ROWS = 64

    def __init__(self, model, loss_fn, data, directions, params=None, batch_size=None, points_per_pass=None,
                 fast_path=None, memory_budget=64 * 2**20, zd_cache_bytes=0, output_fn=None):
        self.model, self.loss_fn, self.output_fn = model, loss_fn, output_fn
        self.zd_cache_bytes = zd_cache_bytes
        self._io_cache, self._zd_cache = {}, {}
        self.batches = as_batches(data, batch_size)
        self.num_samples = sum(batch_size_of(b[0]) for b in self.batches)
        self.names, chosen = chosen_parameters(model, params)
        self.theta0 = [p.detach() for p in chosen]
        self.shapes = [tuple(p.shape) for p in self.theta0]
        self.sizes = [p.numel() for p in self.theta0]
        P = sum(self.sizes)
        d = _flat_directions(directions, self.names, self.shapes, self.sizes, P)
        self.directions = d.to(self.theta0[0].device, self.theta0[0].dtype)
        layer = self._single_linear_weight()
        if fast_path is True and layer is None:
            raise ValueError("fast_path=True needs params to be exactly one nn.Linear weight of an nn.Sequential model")
        self.layer_index = layer if fast_path is not False else None
        self.fused = self.layer_index is not None and self._fused_applies()
        budget_points = self._points_for_budget(memory_budget, P)
        if points_per_pass is None:  # the fast paths' temporaries are bounded by row tiles or never formed
            if self.fused:
                points_per_pass = self.MAX_POINTS_PER_PASS
            else:
                points_per_pass = self.FAST_POINTS_PER_PASS if self.layer_index is not None else budget_points
        elif not isinstance(points_per_pass, int) or points_per_pass < 1:
            raise ValueError(f"points_per_pass must be a positive int or None, got {points_per_pass!r}")
        self.points_per_pass = points_per_pass

    def _row_blocks(self):
        """The batches cut into blocks of at most ROW_BLOCK rows (views): the temporaries of a pass then
        stay small enough to be reused by the allocator instead of being mapped afresh every pass."""
        for x, y in self.batches:
            for r in range(0, batch_size_of(x), self.ROW_BLOCK):
                yield slice_batch(x, r, r + self.ROW_BLOCK), y[r : r + self.ROW_BLOCK]

    def _points_for_budget(self, memory_budget, P):
        if not float(memory_budget) > 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        rows = min(max(batch_size_of(b[0]) for b in self.batches), self.ROW_BLOCK)
        with eval_mode(self.model):
            numel = _activation_numel_per_sample(self.model, self.batches[0][0])
        per_point = (rows * numel + P) * self.theta0[0].element_size()
        return int(min(self.MAX_POINTS_PER_PASS, max(1, memory_budget // per_point)))

    def _fused_applies(self):
        """The layers after the moving Linear are exactly ReLU and a last Linear, under mean cross-entropy
        on class indices: then the compiled ``profile_ce_losses`` evaluates every point without forming
        the moved activations."""
        suffix = list(self.model[self.layer_index + 1 :])
        if [type(m) for m in suffix] != [nn.ReLU, nn.Linear] or loss_kind(self.loss_fn) != "ce":
            return False
        return all(y.dtype == torch.long and y.dim() == 1 and bool((y >= 0).all()) for _, y in self.batches)

    def _single_linear_weight(self):
        if not isinstance(self.model, nn.Sequential) or len(self.names) != 1 or self.output_fn is not None \
                or not all(isinstance(x, torch.Tensor) for x, _ in self.batches):
            return None
        index, _, leaf = self.names[0].partition(".")
        if leaf != "weight" or not index.isdigit() or not isinstance(self.model[int(index)], nn.Linear):
            return None
        return int(index)

    def losses(self, k, delta):
        """(M,) float64 losses at theta0 + delta[m] * directions[k[m]]."""
        k = torch.as_tensor(k, dtype=torch.long)
        delta = torch.as_tensor(delta, dtype=torch.float64)
        out = torch.zeros(k.numel(), dtype=torch.float64)
        with eval_mode(self.model), torch.no_grad():
            for b, (x, y) in enumerate(self._row_blocks()):
                w = batch_size_of(x) / self.num_samples
                out += w * (self._fast(b, x, y, k, delta) if self.layer_index is not None else self._generic(x, y, k, delta))
        return out

    def _point_loss(self, outputs, y):
        return vmap(lambda o: self.loss_fn(o, y))(outputs).double().cpu()

    def _generic(self, x, y, k, delta):
        res = []
        dtype, device = self.theta0[0].dtype, self.theta0[0].device
        for s in range(0, k.numel(), self.points_per_pass):
            kk, dd = k[s : s + self.points_per_pass], delta[s : s + self.points_per_pass].to(device, dtype)
            offsets = self.directions[kk.to(device)] * dd[:, None]  # (M, P)
            stacked = {n: t0 + o.reshape(-1, *shape) for n, t0, o, shape in
                       zip(self.names, self.theta0, offsets.split(self.sizes, 1), self.shapes)}

            def run(values):
                return model_output(call_model(self.model, x, values), self.output_fn)

            with sdpa_kernel(SDPBackend.MATH):  # vmap batches attention's math backend, not the fused kernels
                res.append(self._point_loss(vmap(run)(stacked), y))
        return torch.cat(res)

    def _layer_io(self, b, x):
        """(input, output) of the moving layer for row block ``b``, computed once per evaluator."""
        if b not in self._io_cache:
            a = self.model[: self.layer_index](x)
            self._io_cache[b] = (a, self.model[self.layer_index](a))
        return self._io_cache[b]

    def _all_directions_output(self, b, a):
        """(K, rows, out): how every direction moves the layer's output on block ``b``, kept across
        calls when all K fit ``zd_cache_bytes`` (flatness asks for the same directions pass after pass)."""
        if b not in self._zd_cache:
            W = self.directions.reshape(-1, *self.shapes[0])
            self._zd_cache[b] = torch.einsum("...i,uoi->u...o", a, W)
        return self._zd_cache[b]

    def _caches_directions(self, rows_total, width):
        K = self.directions.shape[0]
        return K * rows_total * width * self.directions.element_size() <= self.zd_cache_bytes

    def _fast(self, b, x, y, k, delta):
        a, z0 = self._layer_io(b, x)  # the layers before the moving one run once per block of rows
        layer = self.model[self.layer_index]
        suffix = self.model[self.layer_index + 1 :]
        M = self.points_per_pass
        if self.fused:
            last = suffix[1]
            cached = self._caches_directions(self.num_samples, layer.out_features)
            res = []
            for s in range(0, k.numel(), M):
                if cached:
                    zd, idx = self._all_directions_output(b, a), k[s : s + M]
                else:
                    used, idx = torch.unique(k[s : s + M], return_inverse=True)
                    W = self.directions[used.to(a.device)].reshape(len(used), *self.shapes[0])
                    zd = torch.einsum("...i,uoi->u...o", a, W)
                dd = delta[s : s + M].to(a.device, a.dtype)
                res.append(ops.profile_ce_losses(z0, zd, idx.to(a.device), dd, last.weight, last.bias, y.to(a.device),
                                                 check_finite=False).cpu() / x.shape[0])
            return torch.cat(res)
        width = max([layer.out_features] + [m.out_features for m in suffix if isinstance(m, nn.Linear)])
        # rows per tile: the M moved outputs of a tile (and the suffix's temporaries) stay cache-sized, so
        # the multiply-add, the activations, the next GEMM and the loss do not stream through memory
        tile = int(min(x.shape[0], max(self.MIN_TILE_ROWS, self.TILE_ELEMENTS // (M * width))))
        res = []
        for s in range(0, k.numel(), M):
            used, idx = torch.unique(k[s : s + M], return_inverse=True)
            idx = idx.to(a.device)
            dd = delta[s : s + M].to(a.device, a.dtype)
            W = self.directions[used.to(a.device)].reshape(len(used), *self.shapes[0])  # (U, out, in)
            zd = torch.einsum("...i,uoi->u...o", a, W)  # (U, *batch, out): the layer's output moves by delta * zd
            total = torch.zeros(idx.numel(), dtype=torch.float64)
            for r in range(0, x.shape[0], tile):
                z = self._moved_outputs(z0[r : r + tile], zd[:, r : r + tile], idx, dd)  # (M, rows, out)
                outputs = self._run_suffix(suffix, z.reshape(-1, *z.shape[2:]))
                rows = z.shape[1]
                total += self._point_loss(outputs.reshape(z.shape[0], rows, *outputs.shape[1:]), y[r : r + tile]) \
                    * (rows / x.shape[0])
            res.append(total)
        return torch.cat(res)


    def _run_suffix(self, suffix, h):
        """The layers after the moving one on (M * rows, features), which are all ours: a ReLU
        rectifies in place, and a Linear with an output width that is not a multiple of 8 multiplies
        by a zero-padded weight (a skinny product of width 10 runs about 2.5x slower on CPU BLAS
        than one of width 16); anything else runs as the module itself."""
        fresh = True  # h is a temporary of this pass
        for module in suffix:
            if type(module) is nn.ReLU and fresh:
                h = h.clamp_min_(0)
            elif type(module) is nn.Linear and h.dim() == 2 and module.out_features % 8:
                h = self._padded_linear(module, h)
                fresh = True
            else:
                h = module(h)
                fresh = False
        return h

    def _padded_linear(self, module, h):
        cache = self.__dict__.setdefault("_padded", {})
        if id(module) not in cache:
            out, width = module.out_features, -(-module.out_features // 8) * 8
            W = module.weight.new_zeros(width, module.in_features)
            W[:out] = module.weight
            cache[id(module)] = W.T
        result = (h @ cache[id(module)])[:, : module.out_features]
        return result + module.bias if module.bias is not None else result

    @staticmethod
    def _moved_outputs(z0, zd, idx, dd):
        """z0 + dd[m] * zd[idx[m]] for every point m, one fused multiply-add per run of consecutive
        points on the same direction (loss_profiles sends points direction by direction), written
        straight into the result: no gathered copy of zd."""
        M = idx.numel()
        z = torch.empty(M, *z0.shape, dtype=z0.dtype, device=z0.device)
        starts = [0] + (torch.nonzero(idx[1:] != idx[:-1]).flatten() + 1).tolist() + [M]
        shape = (-1, *([1] * z0.dim()))
        for s, e in zip(starts[:-1], starts[1:]):
            torch.addcmul(z0, dd[s:e].reshape(shape), zd[int(idx[s])], out=z[s:e])
        return z


def loss_profiles(model, loss_fn, data, directions, deltas, params=None, batch_size=None, points_per_pass=None,
                  fast_path=None, memory_budget=64 * 2**20, output_fn=None):
    """(K, G) float64 mean losses L(theta0 + deltas[g] * directions[k]) over ``data`` ((inputs, targets)
    tensors or an iterable of batches; ``loss_fn`` must return the mean over its batch). ``directions``:
    (K, P) over the chosen ``params`` (flattened in model order) or a dict name -> (K, *shape).
    ``fast_path``: None (use it when only one nn.Linear weight of an nn.Sequential moves), True, False.
    ``points_per_pass`` (None: fitted to ``memory_budget`` bytes) points share each pass over a batch."""
    deltas = torch.as_tensor(deltas, dtype=torch.float64).reshape(-1)
    if deltas.numel() == 0:
        raise ValueError("loss_profiles: deltas holds no offsets (G = 0)")
    if not all_finite(deltas):
        raise ValueError(f"loss_profiles: deltas must be finite, got {int((~torch.isfinite(deltas)).sum())} NaN/Inf offset(s)")
    ev = LossEvaluator(model, loss_fn, data, directions, params, batch_size, points_per_pass, fast_path, memory_budget,
                       output_fn=output_fn)
    K, G = ev.directions.shape[0], deltas.numel()
    return ev.losses(torch.arange(K).repeat_interleave(G), deltas.repeat(K)).reshape(K, G)


@dataclass
class FlatnessResult:
    """Per direction: F = right - left (the widths), the crossing offsets (left < 0 < right), whether a
    side hit the cap (its offset is then the cap), and the loss at theta0."""

    widths: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    saturated_left: torch.Tensor
    saturated_right: torch.Tensor
    loss0: float
    threshold: float

    def to_dict(self):
        return {"widths": self.widths.tolist(), "left": self.left.tolist(), "right": self.right.tolist(),
                "saturated_left": self.saturated_left.tolist(), "saturated_right": self.saturated_right.tolist(),
                "loss0": self.loss0, "threshold": self.threshold}


MAX_BRACKET_STEPS = 100_000  # loss evaluations per ray while stepping out to the cap
_BISECTIONS = 2100  # more halvings than float64 has between its smallest and largest numbers


def flatness(model, loss_fn, data, directions, params=None, threshold=1.0, step=100.0, cap=1000.0, tol=0.01,
             batch_size=None, points_per_pass=None, fast_path=None, memory_budget=64 * 2**20,
             zd_cache_bytes=512 * 2**20):
    """Feng & Tu's (2021) flatness along each direction (unit directions give widths in parameter units). On the
    one-layer fast path the directions are searched in groups whose moved layer outputs fit
    ``zd_cache_bytes`` and are kept across the search's passes."""
    for name, v in (("threshold", threshold), ("step", step), ("cap", cap), ("tol", tol)):
        if not 0 < float(v) < math.inf:
            raise ValueError(f"flatness: {name} must be a finite number > 0, got {v!r}")
    if cap / step > MAX_BRACKET_STEPS:
        raise ValueError(f"flatness: step {step:g} would take up to cap / step = {cap / step:.3g} loss evaluations per "
                         f"ray to reach the cap {cap:g} (at most {MAX_BRACKET_STEPS}); raise step or lower cap")
    resolution = 4 * torch.finfo(torch.float64).eps * float(cap)
    if tol < resolution:
        raise ValueError(f"flatness: tol {tol:g} is below the float64 resolution {resolution:.3g} of offsets up to the "
                         f"cap {cap:g}; the bisection could never reach it (use tol >= {resolution:.3g})")
    probe = LossEvaluator(model, loss_fn, data, directions, params, batch_size, points_per_pass, fast_path, memory_budget)
    K = probe.directions.shape[0]
    loss0 = float(probe.losses([0], [0.0])[0])
    if not loss0 > 0:
        raise ValueError(f"flatness: the loss at theta0 is {loss0}; ln L needs a positive loss")
    limit = torch.log(torch.tensor(loss0, dtype=torch.float64)) + threshold
    group = K
    if probe.layer_index is not None:
        per_direction = probe.num_samples * probe.model[probe.layer_index].out_features * probe.directions.element_size()
        group = int(max(1, min(K, zd_cache_bytes // per_direction)))
    offsets, saturated = [], []
    for g in range(0, K, group):
        ev = LossEvaluator(model, loss_fn, data, probe.directions[g : g + group], params, batch_size, points_per_pass,
                           fast_path, memory_budget, zd_cache_bytes=zd_cache_bytes)
        o, sat = _search_crossings(ev, limit, float(step), float(cap), float(tol))
        offsets.append(o)
        saturated.append(sat)
    n = [min(group, K - g) for g in range(0, K, group)]  # rays of each group: its right ones, then its left ones
    right = torch.cat([o[:m] for o, m in zip(offsets, n)])
    left = -torch.cat([o[m:] for o, m in zip(offsets, n)])
    sat_right = torch.cat([s_[:m] for s_, m in zip(saturated, n)])
    sat_left = torch.cat([s_[m:] for s_, m in zip(saturated, n)])
    return FlatnessResult(right - left, left, right, sat_left, sat_right, loss0, float(threshold))


def _search_crossings(ev, limit, step, cap, tol):
    """Offsets (2K,) where ln L crosses ``limit`` on the rays right (0..K-1) and left (K..2K-1) of every
    direction of ``ev``, and whether each ray hit the cap (its offset is then the cap)."""
    K = ev.directions.shape[0]
    rays = torch.arange(K).repeat(2)  # rays 0..K-1 go right (+), K..2K-1 go left (-)
    sign = torch.cat([torch.ones(K), -torch.ones(K)]).double()
    lo, hi = torch.zeros(2 * K, dtype=torch.float64), torch.full((2 * K,), step, dtype=torch.float64)
    saturated = torch.zeros(2 * K, dtype=torch.bool)
    searching = torch.ones(2 * K, dtype=torch.bool)
    while bool(searching.any()):  # bracketing: step out until ln L exceeds the limit or the cap is passed
        idx = searching.nonzero().flatten()
        above = torch.log(ev.losses(rays[idx], sign[idx] * hi[idx])) > limit
        grow = idx[~above]
        lo[grow] = hi[grow]
        hi[grow] += step
        capped = grow[hi[grow] > cap]
        saturated[capped] = True
        searching[idx[above]] = False
        searching[capped] = False
    active = ~saturated
    for _ in range(_BISECTIONS):  # bisection of every bracketed ray at once (tol >= the resolution: it ends)
        idx = (active & (hi - lo >= tol)).nonzero().flatten()
        if idx.numel() == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        above = torch.log(ev.losses(rays[idx], sign[idx] * mid)) > limit
        hi[idx[above]] = mid[above]
        lo[idx[~above]] = mid[~above]
    return torch.where(saturated, torch.full_like(lo, cap), (lo + hi) / 2), saturated

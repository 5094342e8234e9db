"""Nudged SGD (Jastrzębski et al. 2019): SGD whose step along the top-K Hessian eigenvectors
is scaled by gamma.

With E = [e_1 ... e_K] (orthonormal, over the optimizer's parameters flattened in order), momentum mu,
velocity v and the previous velocity m:
    "correct_v" (default): v = mu m - lr g;  theta += (I - E E^T) v + gamma E E^T v;  m = v
    "correct_g":           g' = (I - E E^T) g + gamma E E^T g;  v = mu m - lr g';  theta += v;  m = v
For mu = 0 both are theta -= lr [(I - E E^T) g + gamma E E^T g]; gamma = 1 is plain SGD. E comes from
``set_subspace`` or, with ``refresh=tracker``, from a ``sharpness.SharpnessTracker`` whenever it has
measured anew (the paper: once per epoch). Until a subspace is known the step is plain SGD.

``build_optimizer`` makes the plain SGD, heavy-ball momentum or Adam optimizer a job's flags name.
"""
import torch

from ..kernels.checks import all_finite

MODES = ("correct_v", "correct_g")


class NSGD(torch.optim.Optimizer):
    def __init__(self, params, lr, gamma=1.0, k=None, momentum=0.0, mode="correct_v", refresh=None):
        if not float(lr) > 0:
            raise ValueError(f"NSGD: lr must be positive, got {lr!r}")
        if not float(gamma) >= 0:
            raise ValueError(f"NSGD: gamma must be >= 0, got {gamma!r}")
        if not 0 <= float(momentum) < 1:
            raise ValueError(f"NSGD: momentum must be in [0, 1), got {momentum!r}")
        if mode not in MODES:
            raise ValueError(f"NSGD: mode must be one of {MODES}, got {mode!r}")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"NSGD: k must be None (every tracked direction) or a positive int, got {k!r}")
        super().__init__(params, {"lr": float(lr), "gamma": float(gamma), "momentum": float(momentum)})
        if len(self.param_groups) != 1:
            raise ValueError("NSGD: one parameter group only (the subspace spans all its parameters)")
        self.k, self.mode, self.refresh = k, mode, refresh
        self.num_params = sum(p.numel() for p in self.param_groups[0]["params"])
        self.E = None
        self._refresh_version = None

    def set_subspace(self, E):
        """E: (P, K) orthonormal columns over the parameters flattened in order (only the first ``k``
        are used when k is set)."""
        E = torch.as_tensor(E)
        if E.dim() != 2 or E.shape[0] != self.num_params:
            raise ValueError(f"NSGD.set_subspace: E must be ({self.num_params}, K), got {tuple(E.shape)}")
        if self.k is not None:
            if E.shape[1] < self.k:
                raise ValueError(f"NSGD.set_subspace: E has {E.shape[1]} columns, fewer than k = {self.k}")
            E = E[:, : self.k]
        if not E.is_floating_point():
            raise TypeError(f"NSGD.set_subspace: E must be a floating-point tensor, got {E.dtype}")
        if not all_finite(E):
            raise ValueError("NSGD.set_subspace: E contains NaN/Inf (one step would turn every weight NaN)")
        gap = float((E.T.double() @ E.double() - torch.eye(E.shape[1], dtype=torch.float64, device=E.device)).abs().max())
        tolerance = 1e-4 if E.dtype == torch.float32 else 1e-8
        if gap > tolerance:
            raise ValueError(f"NSGD.set_subspace: the columns of E must be orthonormal, but max |E^T E - I| = {gap:.3g} "
                             f"(at most {tolerance:g}); orthonormalise them, e.g. torch.linalg.qr(E).Q")
        p0 = self.param_groups[0]["params"][0]
        self.E = E.detach().to(p0.device, p0.dtype)

    def _maybe_refresh(self):
        r = self.refresh
        if r is not None and r.vectors is not None and r.version != self._refresh_version:
            self.set_subspace(r.vectors)
            self._refresh_version = r.version

    def _nudge(self, flat):
        """(I - E E^T) x + gamma E E^T x = x + (gamma - 1) E E^T x."""
        if self.E is None:
            return flat
        return flat + (self.param_groups[0]["gamma"] - 1.0) * (self.E @ (self.E.T @ flat))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._maybe_refresh()
        group = self.param_groups[0]
        params = group["params"]
        if any(p.grad is None for p in params):
            missing = [i for i, p in enumerate(params) if p.grad is None]
            raise RuntimeError(f"NSGD.step: parameters {missing} have no gradient (the subspace needs all of them)")
        g = torch.cat([p.grad.reshape(-1) for p in params])
        lr, mu = group["lr"], group["momentum"]
        state = self.state[params[0]]
        m = state.get("velocity")
        if self.mode == "correct_g":
            g = self._nudge(g)
        v = -lr * g if m is None or mu == 0 else mu * m - lr * g
        delta = self._nudge(v) if self.mode == "correct_v" else v
        if mu != 0:
            state["velocity"] = v.clone()
        offset = 0
        for p in params:
            n = p.numel()
            p.add_(delta[offset : offset + n].view_as(p))
            offset += n
        return loss


OPTIMIZERS = ("sgd", "momentum", "adam")


def build_optimizer(name, params, lr, momentum=0.9, betas=(0.9, 0.999)):
    """The optimizer a run names: ``sgd`` (plain, no momentum), ``momentum`` (heavy-ball SGD with
    ``momentum``) or ``adam`` (``betas``); none has weight decay."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must lie in (0, 1) for the 'momentum' optimizer, got {momentum!r}")
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    betas = tuple(float(b) for b in betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1) for 'adam', got {betas!r}")
    return torch.optim.Adam(params, lr=lr, betas=betas)

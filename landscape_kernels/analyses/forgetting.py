"""Landscape-dependent constraints (LDC) against catastrophic forgetting, and EWC (Feng & Tu 2021).

After task 1, the PCA directions p_1i of the W2 trajectory and their flatness F_1i describe which
directions task 1 is sensitive to. While task 2 is learned, the displacement along them is
q_i = (w - w1*) . p_1i and the penalty on the N_c sharpest directions (smallest F_1i) is, in the two
forms the paper leaves open [unverified]:
    "quadratic": lambda sum_i (q_i / F_1i)^2
    "hinge":     lambda sum_i max(0, |q_i| - xi_i)^2,   xi_i = 0.008 F_1i.
The EWC baseline is (lambda / 2) sum_j F_j (w_j - w1*_j)^2 with the diagonal empirical Fisher of task 1,
on the N_c weights of largest Fisher when N_c is given (None: all weights).
"""
import torch

from ..capture.model import eval_mode
from ..capture.persample import PerSampleGradients

FORMS = ("quadratic", "hinge")
XI_FACTOR = 0.008  # xi_i = 0.008 F_1i [paper]


class LDCPenalty:
    """``penalty(model)`` for ``SGDTrainer``: the LDC term on parameter ``param`` (e.g. "2.weight")."""

    def __init__(self, param, w1, directions, widths, lam, form="quadratic", xi_factor=XI_FACTOR):
        if form not in FORMS:
            raise ValueError(f"LDCPenalty: form must be one of {FORMS}, got {form!r}")
        directions = torch.as_tensor(directions)
        widths = torch.as_tensor(widths, dtype=directions.dtype)
        if directions.dim() != 2 or directions.shape[1] != w1.numel() or widths.shape != (directions.shape[0],):
            raise ValueError(f"LDCPenalty: directions must be (N_c, {w1.numel()}) and widths (N_c,), got "
                             f"{tuple(directions.shape)} and {tuple(widths.shape)}")
        if not bool((widths > 0).all()):
            raise ValueError("LDCPenalty: every flatness F_1i must be positive")
        self.param, self.form, self.lam = param, form, float(lam)
        self.w1 = w1.detach().reshape(-1).clone()
        self.P, self.F = directions.to(self.w1.dtype), widths.to(self.w1.dtype)
        self.xi = xi_factor * self.F

    def displacement(self, model):
        """q_i = (w - w1*) . p_1i, shape (N_c,)."""
        w = dict(model.named_parameters())[self.param].reshape(-1)
        return self.P.to(w.device) @ (w - self.w1.to(w.device))

    def __call__(self, model):
        q = self.displacement(model)
        if self.form == "quadratic":
            return self.lam * ((q / self.F.to(q.device)) ** 2).sum()
        return self.lam * (torch.relu(q.abs() - self.xi.to(q.device)) ** 2).sum()


class EWCPenalty:
    """(lambda / 2) sum_j F_j (w_j - w1*_j)^2 over the parameters of ``fisher`` (a dict name -> diagonal
    Fisher); with ``num_constraints`` only that many weights, those of largest Fisher, are held."""

    def __init__(self, model, fisher, lam, num_constraints=None):
        self.lam = float(lam)
        named = dict(model.named_parameters())
        self.names = list(fisher)
        self.w1 = {n: named[n].detach().clone() for n in self.names}
        self.fisher = {n: fisher[n].detach().clone() for n in self.names}
        if num_constraints is not None:
            flat = torch.cat([self.fisher[n].reshape(-1) for n in self.names])
            if not 1 <= int(num_constraints) <= flat.numel():
                raise ValueError(f"EWCPenalty: num_constraints must be in [1, {flat.numel()}], got {num_constraints}")
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.topk(flat, int(num_constraints)).indices] = True
            offset = 0
            for n in self.names:
                k = self.fisher[n].numel()
                self.fisher[n] = self.fisher[n] * keep[offset : offset + k].reshape(self.fisher[n].shape)
                offset += k

    def __call__(self, model):
        named = dict(model.named_parameters())
        total = 0.0
        for n in self.names:
            total = total + (self.fisher[n] * (named[n] - self.w1[n]) ** 2).sum()
        return 0.5 * self.lam * total


def diagonal_fisher(model, loss_fn, x, y, chunk=4096):
    """Empirical diagonal Fisher E_p[g_p^2] of every Linear/Conv2d parameter over (x, y) (per-sample
    gradients from the fused kernels: E[g^2] = Var[g] + E[g]^2, merged over chunks by sample counts)."""
    total, n = None, 0
    with eval_mode(model):
        for s in range(0, x.shape[0], chunk):
            xs, ys = x[s : s + chunk], y[s : s + chunk]
            ps = PerSampleGradients(model)
            with ps:
                model.zero_grad(set_to_none=True)
                loss_fn(model(xs), ys).backward()
            mean, var = ps.mean(), ps.variance()
            part = {k: (var[k] + mean[k] ** 2) * xs.shape[0] for k in mean}
            total = part if total is None else {k: total[k] + part[k] for k in total}
            n += xs.shape[0]
        model.zero_grad(set_to_none=True)
    return {k: v / n for k, v in total.items()}

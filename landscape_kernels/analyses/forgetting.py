"""Landscape-dependent constraints (LDC) against catastrophic forgetting, and EWC (Feng & Tu 2021).

After task 1, the PCA directions p_1i of the task-1 trajectory (of W2, or of every weight) and their
flatness F_1i describe which directions task 1 is sensitive to. While task 2 is learned, the
displacement along them is q_i = (w - w1*) . p_1i and the penalty on the N_c sharpest directions
(smallest F_1i) is, in the two forms the paper leaves open [unverified]:
    "quadratic": lambda sum_i (q_i / F_1i)^2
    "hinge":     lambda sum_i max(0, |q_i| - xi_i)^2,   xi_i = 0.008 F_1i.
The EWC baseline is (lambda / 2) sum_j F_j (w_j - w1*_j)^2 with the diagonal empirical Fisher of task 1,
on the N_c weights of largest Fisher when N_c is given (None: all weights, the standard form).

Each penalty is a callable ``penalty(model)`` (its value, added to the loss: an explicit step, which
diverges once lr times its curvature exceeds 2) and has ``prox(model, lr)``, the exact proximal step
w <- argmin_u penalty(u) + |u - w|^2 / (2 lr), which ``training.SGDTrainer`` applies after every SGD step
on the task loss: an implicit step, stable for any lambda. All three penalties are separable quadratics
in orthonormal coordinates (q_i, or the weights themselves), so the proximal step is closed-form.
"""
import torch

from ..capture.model import chosen_parameters

FORMS = ("quadratic", "hinge")
XI_FACTOR = 0.008  # xi_i = 0.008 F_1i [paper]


class LDCPenalty:
    """The LDC term on the parameters ``params`` (a name such as "2.weight", or a list of names whose
    flattened values, concatenated in that order, are the coordinates of ``directions``)."""

    def __init__(self, params, w1, directions, widths, lam, form="quadratic", xi_factor=XI_FACTOR):
        if form not in FORMS:
            raise ValueError(f"LDCPenalty: form must be one of {FORMS}, got {form!r}")
        directions = torch.as_tensor(directions)
        widths = torch.as_tensor(widths, dtype=directions.dtype)
        w1 = torch.as_tensor(w1).detach().reshape(-1)
        if directions.dim() != 2 or directions.shape[1] != w1.numel() or widths.shape != (directions.shape[0],):
            raise ValueError(f"LDCPenalty: directions must be (N_c, {w1.numel()}) and widths (N_c,), got "
                             f"{tuple(directions.shape)} and {tuple(widths.shape)}")
        if not bool((widths > 0).all()):
            raise ValueError("LDCPenalty: every flatness F_1i must be positive")
        self.params = [params] if isinstance(params, str) else list(params)
        self.form, self.lam = form, float(lam)
        self.w1 = w1.clone()
        self.P, self.F = directions.to(self.w1.dtype), widths.to(self.w1.dtype)
        self.xi = xi_factor * self.F

    def _flat(self, model):
        return torch.cat([p.reshape(-1) for p in chosen_parameters(model, self.params)[1]])

    def displacement(self, model):
        """q_i = (w - w1*) . p_1i, shape (N_c,)."""
        w = self._flat(model)
        if w.numel() != self.w1.numel():
            raise ValueError(f"LDCPenalty: {self.params} hold {w.numel()} numbers, the directions {self.w1.numel()}")
        return self.P.to(w.device) @ (w - self.w1.to(w.device))

    def __call__(self, model):
        q = self.displacement(model)
        if self.form == "quadratic":
            return self.lam * ((q / self.F.to(q.device)) ** 2).sum()
        return self.lam * (torch.relu(q.abs() - self.xi.to(q.device)) ** 2).sum()

    @torch.no_grad()
    def prox(self, model, lr):
        """The exact proximal step of ``lr`` times the penalty (the directions are orthonormal): only q moves,
        q <- q / (1 + 2 lr lambda / F^2) (quadratic), or the part of |q| beyond xi shrinks by 1 / (1 + 2 lr
        lambda) (hinge)."""
        q = self.displacement(model)
        F, xi = self.F.to(q.device), self.xi.to(q.device)
        if self.form == "quadratic":
            new = q / (1 + 2 * lr * self.lam / F ** 2)
        else:
            excess = torch.relu(q.abs() - xi)
            new = torch.where(excess > 0, q.sign() * (xi + excess / (1 + 2 * lr * self.lam)), q)
        change = (new - q) @ self.P.to(q.device)
        offset = 0
        for p in chosen_parameters(model, self.params)[1]:
            p += change[offset : offset + p.numel()].reshape(p.shape).to(p.dtype)
            offset += p.numel()


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

    @torch.no_grad()
    def prox(self, model, lr):
        """The exact proximal step: w_j <- w1*_j + (w_j - w1*_j) / (1 + lr lambda F_j)."""
        for n, p in zip(*chosen_parameters(model, self.names)):
            w1, f = self.w1[n].to(p.device), self.fisher[n].to(p.device)
            p.copy_(w1 + (p - w1) / (1 + lr * self.lam * f))


def matched_errors(curves, levels):
    """eps1 of each method at matched task-2 errors: ``curves`` {method: [(eps2, eps1), ...]} (a lambda
    sweep), ``levels`` the eps2 values to compare at. Between consecutive points of a curve sorted by eps2,
    eps1 is interpolated linearly; where several segments (or points) reach a level the lowest eps1 counts;
    a level outside a curve's eps2 range gives None (no extrapolation). Returns {method: [eps1 or None]}."""
    out = {}
    for method, points in curves.items():
        pts = sorted((float(e2), float(e1)) for e2, e1 in points if e2 == e2 and e1 == e1)  # drop nan
        row = []
        for level in levels:
            found = [e1 for e2, e1 in pts if e2 == level]
            found += [a1 + (b1 - a1) * (level - a2) / (b2 - a2)
                      for (a2, a1), (b2, b1) in zip(pts, pts[1:]) if a2 < level < b2]
            row.append(min(found) if found else None)
        out[method] = row
    return out

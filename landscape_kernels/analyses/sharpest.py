"""The step analyses of Jastrzębski et al. 2019 around the top-K Hessian eigenvectors.

``decomposed_step``: for random minibatch gradients g_B, the loss change of the partial step
theta' = theta - gamma * lr * (g_B . d) d along each eigenvector d = e_i, along a random unit direction
and of the whole step theta' = theta - gamma * lr * g_B, for every gamma. On a quadratic with curvature
lambda along d the change is -gamma lr (g_B.d)(g.d) + (gamma lr (g_B.d))^2 lambda / 2, so a full step
(gamma = 1) along e_1 stops decreasing the loss once lr lambda_1 reaches 2 while a shorter one does not.

``cross_sections``: the loss along each e_i at offsets eps * s_i, with s_i the SGD step length along
e_i (lr times the mean |g_B . e_i| over the minibatches drawn).

All losses go through ``profiles.LossEvaluator``: every (direction, offset) point of one analysis is
evaluated in batched passes over the data.
"""
from dataclasses import dataclass, field

import torch

from ..capture.model import as_batches, chosen_parameters
from ..linalg.profiles import LossEvaluator

GAMMAS = (0.25, 0.33, 0.5, 1.0, 2.0, 3.0, 4.0)
EPSILONS = (-16.0, -8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _unit_columns(E, P, name):
    E = torch.as_tensor(E)
    if E.dim() == 1:
        E = E[:, None]
    if E.dim() != 2 or E.shape[0] != P or E.shape[1] < 1:
        raise ValueError(f"{name}: E must be (P = {P}, K >= 1) eigenvectors over the chosen parameters, "
                         f"got {tuple(E.shape)}")
    if not torch.isfinite(E).all():
        raise ValueError(f"{name}: E has NaN or Inf entries")
    return E / E.norm(dim=0, keepdim=True).clamp_min(1e-300)


@dataclass
class DecomposedStep:
    """``changes[d, b, g]``: L(theta') - L(theta) for direction row d (``labels``: e_1..e_K, "random",
    "full step"), minibatch b and ``gammas[g]``; ``projections[d, b]`` = g_B . d (the full step's row
    holds ||g_B||)."""

    gammas: list
    labels: list
    loss0: float
    changes: torch.Tensor
    projections: torch.Tensor
    lr: float

    def mean_changes(self):
        """(D, G) mean over minibatches."""
        return self.changes.mean(1)

    def to_dict(self):
        return {"gammas": self.gammas, "labels": self.labels, "loss0": self.loss0, "lr": self.lr,
                "mean_changes": self.mean_changes().tolist(), "std_changes": self.changes.std(1).tolist(),
                "mean_abs_projection": self.projections.abs().mean(1).tolist()}


def decomposed_step(model, loss_fn, data, E, gradients, lr, gammas=GAMMAS, params=None, batch_size=128, seed=0):
    """The decomposed step of Jastrzębski et al. 2019. ``data``: the evaluation set ((x, y) or batches; the paper:
    2560 samples);
    ``E``: (P, K) eigenvectors; ``gradients``: (P, n) minibatch gradients (``minibatch_gradients``)."""
    names, chosen = chosen_parameters(model, params)
    P = sum(p.numel() for p in chosen)
    E = _unit_columns(E, P, "decomposed_step")
    G = torch.as_tensor(gradients)
    if G.dim() != 2 or G.shape[0] != P or G.shape[1] < 1:
        raise ValueError(f"decomposed_step: gradients must be (P = {P}, n >= 1), got {tuple(G.shape)}")
    if not float(lr) > 0:
        raise ValueError(f"decomposed_step: lr must be positive, got {lr!r}")
    gammas = [float(g) for g in gammas]
    if not gammas:
        raise ValueError("decomposed_step: gammas is empty")
    G = G.to(E.device, torch.float64)
    E = E.to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    r = torch.randn(P, generator=gen, dtype=torch.float64).to(E.device)
    r = r / r.norm()
    K, n = E.shape[1], G.shape[1]
    step_norms = G.norm(dim=0)
    directions = torch.cat([E.T, r[None], (G / step_norms.clamp_min(1e-300)).T])  # (K + 1 + n, P)
    projections = torch.cat([E.T @ G, (r @ G)[None], step_norms[None]])  # (K + 2, n)
    gam = torch.tensor(gammas, dtype=torch.float64)
    offsets = -float(lr) * projections[:, :, None].cpu() * gam  # (K + 2, n, Gm)
    rows = torch.arange(K + 2)[:, None, None].expand_as(offsets)
    batch = torch.arange(n)[None, :, None].expand_as(offsets)
    dir_index = torch.where(rows == K + 1, K + 1 + batch, rows)  # the full step of minibatch b is direction K+1+b
    p0 = chosen[0]
    ev = LossEvaluator(model, loss_fn, as_batches(data, batch_size), directions.to(p0.device, p0.dtype), params=names)
    k_all = torch.cat([torch.zeros(1, dtype=torch.long), dir_index.reshape(-1)])
    d_all = torch.cat([torch.zeros(1, dtype=torch.float64), offsets.reshape(-1)])
    losses = ev.losses(k_all, d_all)
    loss0 = float(losses[0])
    changes = (losses[1:] - loss0).reshape(offsets.shape)
    labels = [f"e_{i + 1}" for i in range(K)] + ["random", "full step"]
    return DecomposedStep(gammas, labels, loss0, changes, projections.cpu(), float(lr))


@dataclass
class CrossSections:
    """``losses[i, j]``: L(theta + epsilons[j] * step_lengths[i] * e_i)."""

    epsilons: list
    step_lengths: list
    losses: torch.Tensor = field(repr=False)

    def to_dict(self):
        return {"epsilons": self.epsilons, "step_lengths": self.step_lengths, "losses": self.losses.tolist()}


def cross_sections(model, loss_fn, data, E, step_lengths, epsilons=EPSILONS, params=None, batch_size=128):
    """The cross-sections of Jastrzębski et al. 2019: the loss along each column e_i of ``E`` at ``epsilons`` times
    ``step_lengths[i]`` (e.g. ``lr * mean |g_B . e_i|`` from ``DecomposedStep.projections``)."""
    names, chosen = chosen_parameters(model, params)
    P = sum(p.numel() for p in chosen)
    E = _unit_columns(E, P, "cross_sections")
    s = torch.as_tensor(step_lengths, dtype=torch.float64).reshape(-1)
    if s.numel() != E.shape[1] or not (torch.isfinite(s).all() and (s >= 0).all()):
        raise ValueError(f"cross_sections: step_lengths must be {E.shape[1]} finite non-negative lengths (one per "
                         f"column of E), got {step_lengths!r}")
    eps = torch.as_tensor(epsilons, dtype=torch.float64).reshape(-1)
    if eps.numel() == 0:
        raise ValueError("cross_sections: epsilons is empty")
    K = E.shape[1]
    p0 = chosen[0]
    ev = LossEvaluator(model, loss_fn, as_batches(data, batch_size), E.T.to(p0.device, p0.dtype), params=names)
    losses = ev.losses(torch.arange(K).repeat_interleave(eps.numel()), (s[:, None] * eps).reshape(-1))
    return CrossSections(eps.tolist(), s.tolist(), losses.reshape(K, eps.numel()))


def early_e1_changes(run):
    """Mean loss change of the partial step along e_1 per gamma, averaged over the early analyses
    (every measurement that has one except the one at initialisation)."""
    analysed = [m["decomposed"] for m in run["measurements"] if "decomposed" in m and m["step"] > 0]
    if not analysed:
        return None
    gammas = analysed[0]["gammas"]
    means = [sum(a["mean_changes"][0][j] for a in analysed) / len(analysed) for j in range(len(gammas))]
    return dict(zip(gammas, means))

"""The effective particle model of GAN training (Durr, Mroueh, Tu & Wang, PRX 2023, arXiv 2212.04580);
``docs/reproductions/effective-gan.md``.

The generator is replaced by N particles x_i in output space. A wide generator trained by gradient
descent moves its outputs by its neural tangent kernel; for high-dimensional latent inputs that kernel
is, to leading order, one value g1 on the diagonal and one value g2 off it, K_ij = g2 + (g1 - g2) δ_ij.
With g1 = 1 and φ = g2 / g1 one particle step is

    x_i <- x_i - lr_x Σ_j K_ij ∇ℓ_G(x_j) = x_i - lr_x [(1 - φ) ∇ℓ_G(x_i) + φ Σ_j ∇ℓ_G(x_j)],

ℓ_G(x) = softplus(-s(x)) the non-saturating generator loss of the discriminator's logit s. The
discriminator, a ReLU (or other) MLP, descends its GAN loss

    L_D = mean_data softplus(-s(y)) + mean_particles softplus(s(x)) + (γ / 2) mean_data |∇_y s(y)|^2
          + (wd / 2) |w|^2

(the last-but-one term the R1 gradient penalty, Mescheder et al. 2018), with its own learning rate.
Both players step simultaneously from the same state.

``ParticleGAN`` advances S settings at once: every tensor carries a leading settings axis, the
discriminators are batched matrix products, and each setting has its own φ, discriminator learning
rate and penalty strength; all start from the same particles and the same discriminator weights, so
the settings differ only by what is varied.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DISC_OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "elu": F.elu, "sin": torch.sin}


def settings_tensor(values, count, name, dtype):
    """``values`` (a number or one per setting) as a (count,) tensor, checked finite and >= 0."""
    t = torch.as_tensor(values, dtype=dtype).flatten()
    if t.numel() == 1:
        t = t.expand(count).clone()
    if t.numel() != count:
        raise ValueError(f"{name} must be one number or {count} (one per setting), got {t.numel()}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {t.tolist()}")
    return t


def kernel_step(grads, phi):
    """Σ_j K_ij g_j for K = (1 - φ) I + φ 11^T, per setting: grads (S, N, d), phi (S,)."""
    phi = phi.to(grads.dtype)[:, None, None]
    return (1 - phi) * grads + phi * grads.sum(1, keepdim=True)


def kernel_rates(num_particles, phi):
    """The kernel's two eigenvalues (per unit lr_x): the centre of mass moves at 1 + (N - 1) φ, every
    relative coordinate at 1 - φ."""
    return 1 + (num_particles - 1) * phi, 1 - phi


@dataclass
class Discriminator:
    """S batched MLPs: weights[l] (S, fan_in, fan_out), biases[l] (S, 1, fan_out); the last layer has one
    output, the logit."""
    weights: list
    biases: list
    activation: str = "relu"

    @staticmethod
    def init(num_settings, sizes, activation="relu", seed=0, dtype=torch.float32):
        """He-uniform weights (torch.nn.Linear's default), the same for every setting."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        g = torch.Generator().manual_seed(seed)
        weights, biases = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            w = (torch.rand(fan_in, fan_out, generator=g, dtype=dtype) * 2 - 1) * bound
            b = (torch.rand(1, fan_out, generator=g, dtype=dtype) * 2 - 1) * bound
            weights.append(w.expand(num_settings, -1, -1).clone())
            biases.append(b.expand(num_settings, -1, -1).clone())
        return Discriminator(weights, biases, activation)

    def parameters(self):
        return self.weights + self.biases

    def __call__(self, x, params=None):
        """Logits (S, M) of inputs x (S, M, d)."""
        params = self.parameters() if params is None else params
        L = len(self.weights)
        ws, bs = params[:L], params[L:]
        act = ACTIVATIONS[self.activation]
        h = x
        for k, (w, b) in enumerate(zip(ws, bs)):
            h = torch.baddbmm(b, h, w)
            if k < L - 1:
                h = act(h)
        return h.squeeze(-1)


class ParticleGAN:
    """S settings of the particle model advanced together.

    ``particles`` (N, d) start positions (the same for every setting), ``targets`` (M, d) the data;
    ``phi``, ``disc_lr``, ``penalty`` one value or one per setting. ``step()`` makes one simultaneous
    step of both players."""

    def __init__(self, particles, targets, phi, disc_lr, particle_lr, hidden=(128,), activation="relu",
                 weight_decay=1e-4, penalty=0.0, disc_optimizer="adam", seed=0):
        if particles.ndim != 2 or targets.ndim != 2 or particles.shape[1] != targets.shape[1]:
            raise ValueError(f"particles (N, d) and targets (M, d) must share d, got {tuple(particles.shape)} and "
                             f"{tuple(targets.shape)}")
        if particles.shape[0] < 1 or targets.shape[0] < 1:
            raise ValueError("particles and targets must not be empty")
        if not (bool(torch.isfinite(particles).all()) and bool(torch.isfinite(targets).all())):
            raise ValueError("particles and targets must be finite")
        dtype = particles.dtype
        counts = [torch.as_tensor(v).numel() for v in (phi, disc_lr, penalty)]
        S = max(counts)
        self.phi = settings_tensor(phi, S, "phi", dtype)
        if bool((self.phi >= 1).any()):
            raise ValueError(f"phi = g2/g1 must be below 1 (at 1 the particles cannot move apart), got "
                             f"{self.phi.tolist()}")
        self.disc_lr = settings_tensor(disc_lr, S, "disc_lr", dtype)
        self.penalty = settings_tensor(penalty, S, "penalty", dtype)
        if not particle_lr > 0 or weight_decay < 0:
            raise ValueError(f"particle_lr must be > 0 and weight_decay >= 0, got {particle_lr}, {weight_decay}")
        if disc_optimizer not in DISC_OPTIMIZERS:
            raise ValueError(f"disc_optimizer must be one of {DISC_OPTIMIZERS}, got {disc_optimizer!r}")
        self.particle_lr, self.weight_decay = float(particle_lr), float(weight_decay)
        self.disc_optimizer = disc_optimizer
        self.num_settings = S
        self.x = particles.expand(S, -1, -1).clone()
        self.targets = targets
        self.disc = Discriminator.init(S, (targets.shape[1], *hidden, 1), activation, seed, dtype)
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.disc.parameters()]
        self.steps = 0

    def step(self):
        """One simultaneous step; returns the discriminator's loss per setting (S,)."""
        params = [p.detach().requires_grad_(True) for p in self.disc.parameters()]
        x = self.x.detach().requires_grad_(True)
        y = self.targets.expand(self.num_settings, -1, -1)
        penalised = bool((self.penalty > 0).any())
        if penalised:
            y = y.detach().clone().requires_grad_(True)
        s_real = self.disc(y, params)
        s_fake = self.disc(x, params)
        loss_d = F.softplus(-s_real).mean(1) + F.softplus(s_fake).mean(1)
        total = loss_d.sum()
        if penalised:
            (gy,) = torch.autograd.grad(s_real.sum(), y, create_graph=True)
            total = total + (0.5 * self.penalty * gy.pow(2).sum(-1).mean(1)).sum()
        disc_grads = torch.autograd.grad(total, params, retain_graph=True)
        # the generator's loss Σ_i softplus(-s(x_i)) at the same (pre-step) discriminator
        (gx,) = torch.autograd.grad(F.softplus(-s_fake).sum(), x)
        with torch.no_grad():
            self.steps += 1
            lr = self.disc_lr[:, None, None]
            for p, g, (m, v) in zip(self.disc.parameters(), disc_grads, self.moments):
                g = g + self.weight_decay * p
                if self.disc_optimizer == "sgd":
                    p.sub_(lr * g)
                    continue
                # Adam (Kingma & Ba 2015) with its default betas, each setting with its own lr
                m.mul_(ADAM_BETAS[0]).add_(g, alpha=1 - ADAM_BETAS[0])
                v.mul_(ADAM_BETAS[1]).addcmul_(g, g, value=1 - ADAM_BETAS[1])
                m_hat = m / (1 - ADAM_BETAS[0] ** self.steps)
                v_hat = v / (1 - ADAM_BETAS[1] ** self.steps)
                p.sub_(lr * m_hat / (v_hat.sqrt() + ADAM_EPS))
            self.x = self.x - self.particle_lr * kernel_step(gx, self.phi)
        return loss_d.detach()

    def logits(self, x=None):
        with torch.no_grad():
            return self.disc(self.x if x is None else x)


# ----------------------------------------------------------------------------- measurements
def cosine_distances(a, b):
    """1 - cos between the rows of a (..., P, d) and b (M, d): (..., P, M)."""
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1 - an @ bn.transpose(-1, -2)


COUNTS = ("targets", "particles")


def diversity_score(particles, targets, count="targets"):
    """log M + Σ_k p_k log p_k over the nearest-neighbour shares under cosine distance: 0 when the shares
    are uniform over M = number of targets (every target has its own particle), log M when one takes
    all (collapse). particles (..., N, d), targets (M, d); returns (...).

    ``count="targets"``: p_k is the share of target images whose nearest particle is particle k (the
    definition in the paper's text); ``count="particles"``: p_k is the share of particles whose nearest
    target is image k (the authors' analysis notebook). Both need N = M for the uniform case to be 0."""
    if count not in COUNTS:
        raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
    d = cosine_distances(particles, targets)  # (..., N, M)
    if count == "targets":
        nearest, bins = d.argmin(-2), particles.shape[-2]  # (..., M): each target's particle
    else:
        nearest, bins = d.argmin(-1), targets.shape[0]  # (..., N): each particle's target
    flat = nearest.reshape(-1, nearest.shape[-1])
    hist = torch.zeros(flat.shape[0], bins, dtype=torch.float64)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    p = hist / hist.sum(1, keepdim=True)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
    return (math.log(targets.shape[0]) + plogp.sum(1)).reshape(nearest.shape[:-1])


def covered_targets(particles, targets):
    """How many target images are some particle's nearest target (cosine), per setting: (...)."""
    nearest = cosine_distances(particles, targets).argmin(-1)
    flat = nearest.reshape(-1, nearest.shape[-1])
    hits = torch.zeros(flat.shape[0], targets.shape[0], dtype=torch.bool)
    hits.scatter_(1, flat, True)
    return hits.sum(1).reshape(nearest.shape[:-1])


def mean_nearest_distance(particles, targets):
    """The mean over particles of the cosine distance to their nearest target: (...)."""
    return cosine_distances(particles, targets).min(-1).values.mean(-1)


# ----------------------------------------------------------------------------- damping
def convergence_step(distances, tolerance):
    """The first index after which ``distances`` (a recorded series, distances[0] the start) stays at
    or below ``tolerance`` times distances[0]; None when its last value is still above."""
    d = torch.as_tensor(distances, dtype=torch.float64)
    above = (d > tolerance * d[0]).nonzero()
    if len(above) == 0:
        return 0
    last = int(above[-1])
    return None if last == len(d) - 1 else last + 1


def oscillator_fit(series, dt=1.0):
    """A damped linear oscillator fitted to ``series`` (a 1-D recorded coordinate relaxing toward an
    unknown end value) by the second-order linear recurrence u_{t+2} = a u_{t+1} + b u_t + c (least
    squares): the exact discrete solution of m u'' + k_d u' + k (u - u_end) = 0 sampled every ``dt``.
    The recurrence's roots z give the continuous rates λ = log z / dt; returns the natural frequency
    ω0 = |λ1 λ2|^(1/2), the damping ratio ζ = -(λ1 + λ2) / (2 ω0) (below 1 it oscillates, 1 is
    critical, above 1 it creeps), the oscillation frequency (0 when the roots are real), the decay rate
    -max Re λ, and the R^2 of the fitted oscillator run from the series' first two values. ``None`` when the series is too short or flat."""
    u = torch.as_tensor(series, dtype=torch.float64).flatten()
    if u.numel() < 6 or float(u.max() - u.min()) == 0:
        return None
    A = torch.stack([u[1:-1], u[:-2], torch.ones_like(u[2:])], 1)
    target = u[2:]
    coef = torch.linalg.lstsq(A, target[:, None], driver="gelsd").solution.flatten()
    a, b, c = (float(v) for v in coef)
    # R^2 of the oscillator run freely from the first two values (not the one-step predictions, which
    # any smooth series fits)
    free = [float(u[0]), float(u[1])]
    for _ in range(u.numel() - 2):
        free.append(a * free[-1] + b * free[-2] + c)
    residual = u - torch.tensor(free, dtype=torch.float64)
    r2 = 1 - float(residual.pow(2).sum()) / max(float((u - u.mean()).pow(2).sum()), 1e-300)
    roots = torch.linalg.eigvals(torch.tensor([[a, b], [1.0, 0.0]], dtype=torch.float64))
    if bool((roots.abs() == 0).any()):
        return None
    lam = torch.log(roots.to(torch.complex128)) / dt
    product, total = lam[0] * lam[1], lam[0] + lam[1]
    omega0 = math.sqrt(abs(float(product.real)))
    if omega0 == 0:
        return None
    return {"a": a, "b": b, "natural_frequency": omega0, "damping_ratio": -float(total.real) / (2 * omega0),
            "frequency": abs(float(lam[0].imag)), "decay_rate": -max(float(lam.real[0]), float(lam.real[1])),
            "r2": r2}

"""The effective GAN particle model (Durr, Mroueh, Tu & Wang 2023): the kernel step against the explicit
K matrix, the batched step against one setting at a time and against autograd on an nn.Module, the
diversity score on particle sets with known scores, and the oscillator fit on series with known
damping."""
import math

import pytest
import torch
import torch.nn.functional as F

from landscape_kernels.analyses.effective_gan import (
    Discriminator, ParticleGAN, convergence_step, cosine_distances, covered_targets, diversity_score, kernel_rates,
    kernel_step, mean_nearest_distance, oscillator_fit)


def test_kernel_step_is_the_explicit_kernel_matrix(gen):
    S, N, d = 3, 7, 5
    grads = torch.randn(S, N, d, generator=gen, dtype=torch.float64)
    phi = torch.tensor([0.0, 0.3, 0.95], dtype=torch.float64)
    for s in range(S):
        K = phi[s] + (1 - phi[s]) * torch.eye(N, dtype=torch.float64)  # g1 = 1, g2 = φ
        assert torch.allclose(kernel_step(grads, phi)[s], K @ grads[s], atol=1e-13)
        eig = torch.linalg.eigvalsh(K)
        centre, relative = kernel_rates(N, float(phi[s]))
        assert float(eig[-1]) == pytest.approx(centre) and float(eig[0]) == pytest.approx(relative)


def test_batched_discriminator_matches_nn_linear(gen):
    disc = Discriminator.init(2, (6, 9, 1), "tanh", seed=4, dtype=torch.float64)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(disc.weights[0][1].T)
        net[0].bias.copy_(disc.biases[0][1, 0])
        net[2].weight.copy_(disc.weights[1][1].T)
        net[2].bias.copy_(disc.biases[1][1, 0])
    x = torch.randn(2, 11, 6, generator=gen, dtype=torch.float64)
    assert torch.allclose(disc(x)[1], net(x[1]).squeeze(-1), atol=1e-13)
    assert torch.equal(disc.weights[0][0], disc.weights[0][1])  # every setting starts from the same weights
    with pytest.raises(ValueError, match="activation must be one of"):
        Discriminator.init(1, (2, 1), "swish")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batched_settings_step_like_one_setting_at_a_time(gen, optimizer):
    x0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 4, generator=gen, dtype=torch.float64) + 1
    phi, lr, pen = [0.0, 0.5, 0.9], [1e-2, 3e-2, 1e-3], [0.0, 1.0, 0.3]
    both = ParticleGAN(x0, y, phi, lr, 0.05, hidden=(5,), penalty=pen, disc_optimizer=optimizer)
    alone = [ParticleGAN(x0, y, p, l, 0.05, hidden=(5,), penalty=g, disc_optimizer=optimizer)
             for p, l, g in zip(phi, lr, pen)]
    for _ in range(4):
        both.step()
        for a in alone:
            a.step()
    for s, a in enumerate(alone):
        assert torch.allclose(both.x[s], a.x[0], atol=1e-12)
        assert torch.allclose(both.disc.weights[0][s], a.disc.weights[0][0], atol=1e-12)


def test_one_sgd_step_is_the_gan_gradient_step(gen):
    """The first step against autograd on an nn.Module: the discriminator's loss with the R1 penalty and
    weight decay, the particles' kernel-coupled non-saturating step."""
    x0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    phi, lr_d, lr_x, wd, gamma = 0.4, 0.1, 0.2, 1e-2, 0.7
    gan = ParticleGAN(x0, y, phi, lr_d, lr_x, hidden=(6,), weight_decay=wd, penalty=gamma, disc_optimizer="sgd")
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1)).double()
    with torch.no_grad():
        for k, layer in enumerate((net[0], net[2])):
            layer.weight.copy_(gan.disc.weights[k][0].T)
            layer.bias.copy_(gan.disc.biases[k][0, 0])
    yr = y.clone().requires_grad_(True)
    s_real = net(yr).squeeze(-1)
    (gy,) = torch.autograd.grad(s_real.sum(), yr, create_graph=True)
    loss = F.softplus(-s_real).mean() + F.softplus(net(x0).squeeze(-1)).mean() + gamma / 2 * gy.pow(2).sum(1).mean()
    loss = loss + wd / 2 * sum(p.pow(2).sum() for p in net.parameters())
    loss.backward()
    xg = x0.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(F.softplus(-net(xg).squeeze(-1)).sum(), xg)
    K = phi + (1 - phi) * torch.eye(5, dtype=torch.float64)
    gan.step()
    assert torch.allclose(gan.x[0], x0 - lr_x * K @ gx, atol=1e-12)
    assert torch.allclose(gan.disc.weights[0][0], (net[0].weight - lr_d * net[0].weight.grad).T.detach(), atol=1e-12)


def test_bad_settings_name_the_argument():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="phi = g2/g1 must be below 1"):
        ParticleGAN(x, x + 1, 1.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="phi must be one number or 3"):
        ParticleGAN(x, x + 1, [0.1, 0.2], [0.1, 0.2, 0.3], 0.1)
    with pytest.raises(ValueError, match="share d"):
        ParticleGAN(x, torch.zeros(3, 4), 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="finite"):
        ParticleGAN(x, torch.full((3, 2), float("nan")), 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="disc_optimizer"):
        ParticleGAN(x, x + 1, 0.1, 0.1, 0.1, disc_optimizer="rmsprop")


def test_diversity_score_on_known_particle_sets(gen):
    M = 100
    targets = torch.randn(M, 20, generator=gen, dtype=torch.float64)
    log_m = math.log(M)
    for count in ("targets", "particles"):
        # every particle on its own target: full coverage
        assert float(diversity_score(targets.clone(), targets, count)) == pytest.approx(0, abs=1e-12)
        # a shuffled copy is still full coverage
        perm = torch.randperm(M, generator=gen)
        assert float(diversity_score(targets[perm], targets, count)) == pytest.approx(0, abs=1e-12)
    # every particle on one target: collapse
    assert float(diversity_score(targets[[3] * M], targets, "particles")) == pytest.approx(log_m, abs=1e-12)
    # two particles exactly on targets 0 and 1 and the rest far: the targets split 2 ways with their own share
    # counted per particle, here half the particles on target 0 and half on target 1: log M - log 2
    half = targets[[0] * 50 + [1] * 50]
    assert float(diversity_score(half, targets, "particles")) == pytest.approx(log_m - math.log(2), abs=1e-12)
    # the "targets" count with one particle nearest to every target (the others far out along -target 0)
    lone = torch.cat([targets.mean(0, keepdim=True), -targets[:1].expand(M - 1, -1)])
    lone_score = diversity_score(lone, targets, "targets")
    shares = torch.bincount(cosine_distances(lone, targets).argmin(0), minlength=M).double() / M
    expect = log_m + float((shares[shares > 0] * shares[shares > 0].log()).sum())
    assert float(lone_score) == pytest.approx(expect, abs=1e-12)
    # batched over settings
    both = torch.stack([targets, targets[[3] * M]])
    assert torch.allclose(diversity_score(both, targets, "particles"), torch.tensor([0, log_m], dtype=torch.float64))
    assert covered_targets(both, targets).tolist() == [M, 1]
    assert mean_nearest_distance(both, targets).abs().max() < 1e-12
    with pytest.raises(ValueError, match="count must be one of"):
        diversity_score(targets, targets, "pixels")


def test_cosine_distance_is_scale_free(gen):
    a = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    d = cosine_distances(a, b)
    assert torch.allclose(d, cosine_distances(3 * a, 0.5 * b), atol=1e-13)
    assert torch.allclose(d[1, 2], 1 - F.cosine_similarity(a[1], b[2], dim=0), atol=1e-13)


@pytest.mark.parametrize("zeta", [0.2, 0.6, 1.0, 2.5])
def test_oscillator_fit_recovers_the_damping_ratio(zeta):
    """Sampled solutions of u'' + 2 ζ ω0 u' + ω0² u = 0 (under-, critically and over-damped) and an offset."""
    omega0, dt = 0.3, 0.5
    t = torch.arange(200, dtype=torch.float64) * dt
    if zeta < 1:
        wd = omega0 * math.sqrt(1 - zeta ** 2)
        u = torch.exp(-zeta * omega0 * t) * torch.cos(wd * t + 0.4)
    elif zeta == 1:
        u = (1 + 0.7 * t) * torch.exp(-omega0 * t)
    else:
        r = omega0 * math.sqrt(zeta ** 2 - 1)
        u = torch.exp((-zeta * omega0 + r) * t) - 0.3 * torch.exp((-zeta * omega0 - r) * t)
    fit = oscillator_fit((u + 2.0).tolist(), dt=dt)  # relaxing toward an end value the fit does not know
    assert fit["damping_ratio"] == pytest.approx(zeta, rel=1e-3, abs=2e-3)
    assert fit["natural_frequency"] == pytest.approx(omega0, rel=1e-3)
    assert fit["r2"] > 0.999999
    assert (fit["frequency"] > 0) == (zeta < 1)
    assert oscillator_fit([1.0] * 8) is None and oscillator_fit([1.0, 0.5]) is None


def test_convergence_step():
    assert convergence_step([1.0, 0.5, 0.2, 0.01, 0.02, 0.01], 0.05) == 3
    assert convergence_step([1.0, 0.01, 0.2, 0.01], 0.05) == 3  # it must stay below
    assert convergence_step([1.0, 0.5, 0.2], 0.05) is None

"""Mori et al. 2022 building blocks: the linear-regression SGD simulator, the maximum-likelihood phi of
P ~ L^-phi (checked on exact samples), and the first-passage harness."""
import math

import pytest
import torch

from landscape_kernels.analyses.escape import (LinearRegressionSGD, fit_stationary_exponent, gaussian_regression_data,
                                               passage_slope, passage_slope_theory, passage_time_theory,
                                               sample_stationary, stationary_exponent_theory)


@pytest.mark.parametrize("phi,dim", [(11.0, 1), (6.0, 3), (2.5, 2)])
def test_mle_recovers_phi_from_exact_samples(phi, dim):
    H = torch.diag(torch.linspace(0.5, 2.0, dim, dtype=torch.float64))
    u = sample_stationary(phi, H, 0.5, 40000, seed=dim)
    losses = 0.5 + 0.5 * ((u @ H) * u).sum(1)
    fit = fit_stationary_exponent(losses, 0.5, dim)
    assert abs(fit.phi - phi) < 4 * fit.stderr and fit.stderr < 0.02 * phi and fit.num_samples == 40000


def test_one_sgd_step_by_hand_and_the_exact_loss():
    x, y = gaussian_regression_data(50, 3, seed=1)
    theta0 = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    sim = LinearRegressionSGD(x, y, lr=0.05, batch_size=4, num_runs=2, theta0=theta0, seed=3)
    assert torch.allclose(x.T @ (x @ sim.theta_star - y), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    idx = LinearRegressionSGD(x, y, lr=0.05, batch_size=4, num_runs=2, theta0=theta0, seed=3)._indices(1)[0]
    sim.run(1)
    for r in range(2):
        xb, yb = x[idx[r]], y[idx[r]]
        assert len(set(idx[r].tolist())) == 4  # without replacement inside a minibatch
        want = theta0 - 0.05 * xb.T @ (xb @ theta0 - yb) / 4
        assert torch.allclose(sim.theta[r], want, atol=1e-14)
    direct = 0.5 * ((x @ sim.theta.T - y[:, None]) ** 2).mean(0)
    assert torch.allclose(sim.loss(), direct, rtol=1e-12)


@pytest.mark.parametrize("B", [1, 8])
def test_stationary_phi_of_sgd_is_within_15_percent_of_theory(B):
    """Mori et al. 2022: 1-D regression, N = 10^5, lr 0.1; fitted phi 5-10 % below 1 + B / (lr h*)."""
    x, y = gaussian_regression_data(100_000, 1, seed=0)
    sim = LinearRegressionSGD(x, y, lr=0.1, batch_size=B, num_runs=100, seed=1)
    samples = sim.sample(100, every=100, burn_in=2000)
    fit = fit_stationary_exponent(sim.loss(samples.reshape(-1, 1)), sim.loss_star, 1)
    theory = stationary_exponent_theory(B, 0.1, float(sim.hessian))
    assert 0.85 * theory < fit.phi < theory


def test_first_passage_times_grow_with_the_threshold():
    x, y = gaussian_regression_data(10_000, 3, seed=0)
    sim = LinearRegressionSGD(x, y, lr=0.1, batch_size=1, num_runs=50, seed=1)
    c = [1.2, 1.5, 2.0]
    first = sim.first_passage(c, max_steps=50_000)
    assert not first.isnan().any() and (first[:, 0] <= first[:, 1]).all() and (first[:, 1] <= first[:, 2]).all()
    fit = passage_slope(c, first.mean(0))
    assert fit.exponent > 1
    never = LinearRegressionSGD(x, y, lr=0.1, batch_size=1, num_runs=3, seed=1).first_passage([1e6], max_steps=100)
    assert never.isnan().all()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_passage_time_theory_limits(dim):
    """Small c: free diffusion, mean exit time from a ball a^2 / (2 d D) = B (c - 1) / (d lr h^2).
    Large c: the slope in log c tends to B / (lr h) + 1 - d / 2 (Mori et al. 2022)."""
    B, lr, h = 2, 0.1, 1.3
    eps = 1e-6
    (t,) = passage_time_theory([1 + eps], B, lr, h, dim)
    assert t == pytest.approx(B * eps / (dim * lr * h * h), rel=1e-4)
    t1, t2 = passage_time_theory([1e5, 2e5], B, lr, h, dim)
    assert math.log(t2 / t1) / math.log(2) == pytest.approx(passage_slope_theory(B, lr, h, dim), rel=1e-4)
    mid = passage_time_theory([1.6, 1.1, 1.3], B, lr, h, dim)  # any order
    assert mid[1] < mid[2] < mid[0]


def test_passage_time_theory_matches_a_simulated_sde():
    """Euler-Maruyama on de = -h e dt + sqrt(2 D) dW, D = lr h L / B (Mori et al. 2022's decoupled noise), d = 2."""
    B, lr, h, loss_star, c, dt, runs = 1, 0.1, 1.0, 0.5, 1.2, 5e-4, 2000
    g = torch.Generator().manual_seed(0)
    e = torch.zeros(runs, 2, dtype=torch.float64)
    exit_time = torch.full((runs,), math.nan, dtype=torch.float64)
    step = 0
    while exit_time.isnan().any():
        step += 1
        loss = loss_star + 0.5 * h * (e * e).sum(1)
        e = e - h * e * dt + torch.sqrt(2 * lr * h * loss / B * dt)[:, None] * torch.randn(runs, 2, generator=g, dtype=torch.float64)
        out = (loss_star + 0.5 * h * (e * e).sum(1) > c * loss_star) & exit_time.isnan()
        exit_time[out] = step * dt
    (theory,) = passage_time_theory([c], B, lr, h, 2)
    assert exit_time.mean().item() == pytest.approx(theory, rel=0.07)


def test_bad_input_names_the_argument():
    x, y = gaussian_regression_data(20, 2)
    with pytest.raises(ValueError, match="batch_size"):
        LinearRegressionSGD(x, y, lr=0.1, batch_size=0)
    with pytest.raises(ValueError, match="x must be"):
        LinearRegressionSGD(x, y[:5], lr=0.1, batch_size=1)
    with pytest.raises(ValueError, match="NaN"):
        LinearRegressionSGD(x, y * math.nan, lr=0.1, batch_size=1)
    with pytest.raises(ValueError, match="thresholds"):
        LinearRegressionSGD(x, y, lr=0.1, batch_size=1).first_passage([0.5], 10)
    with pytest.raises(ValueError, match="loss_star"):
        fit_stationary_exponent([1.0, 2.0], 1.5, 1)
    with pytest.raises(ValueError, match="thresholds"):
        passage_time_theory([1.0], 1, 0.1, 1.0, 1)
    with pytest.raises(ValueError, match="no stationary state"):
        passage_time_theory([1.5], 1, 1.0, 1.0, 6)
    with pytest.raises(ValueError, match="dim"):
        passage_time_theory([1.5], 1, 0.1, 1.0, 0)
    with pytest.raises(ValueError, match="phi must exceed"):
        sample_stationary(0.4, torch.eye(1, dtype=torch.float64), 0.5, 10)

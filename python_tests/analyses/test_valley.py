"""The degenerate-valley model (Yang, Tang & Tu 2023): closed forms against autograd, the vectorised
chains against a per-chain loop, GD staying where it reaches the valley, and the effective-loss drift
against the simulated chains."""
import math

import pytest
import torch

from landscape_kernels.analyses.valley import (
    ValleyData, ValleySGD, collapse_bound, drift_rate, effective_loss, first_below, flat_position, gradient, hessian,
    loss, origin_exponents, theory_path, valley_dataset, valley_point, valley_position, valley_sharpness)


@pytest.fixture(scope="module")
def data():
    return valley_dataset(400, valley=1.0, b_spread=1.0, a_spread=0.3, seed=3)


def per_sample_loss(data, w, rows=None):
    a, b = (data.a, data.b) if rows is None else (data.a[rows], data.b[rows])
    return 0.5 * (a * (w[0] * w[1] - b) ** 2).mean()


def test_closed_forms_match_autograd(data):
    g = torch.Generator().manual_seed(0)
    points = torch.randn(5, 2, generator=g, dtype=torch.float64) * 1.5
    for w in points:
        assert torch.allclose(loss(data, w), per_sample_loss(data, w), rtol=1e-13)
        assert torch.allclose(gradient(data, w), torch.func.grad(lambda v: per_sample_loss(data, v))(w), atol=1e-12)
        assert torch.allclose(hessian(data, w), torch.func.hessian(lambda v: per_sample_loss(data, v))(w), atol=1e-12)
    assert abs(data.valley - 1.0) < 1e-12 and abs(data.a_mean - 1.0) < 1e-12


def test_valley_points_sharpness_and_flattest_point(data):
    for lam in (data.min_sharpness(), 3.0, 8.0):
        w = valley_point(data, lam)
        assert abs(float(w[0] * w[1]) - data.valley) < 1e-12
        eig = torch.linalg.eigvalsh(hessian(data, w))
        assert abs(float(eig[-1]) - lam) < 1e-10 and abs(float(eig[0])) < 1e-10  # one flat direction
        assert abs(float(valley_sharpness(data, valley_position(w))) - lam) < 1e-10
    assert torch.allclose(valley_point(data, data.min_sharpness()), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="sharpness"):
        valley_point(data, 0.5 * data.min_sharpness())
    assert abs(float(valley_sharpness(data, flat_position(data, 0.1))) - 1.1 * data.min_sharpness()) < 1e-12


def test_chains_against_a_loop_of_autograd_steps(data):
    start = torch.tensor([[2.0, 0.3], [0.5, 1.5], [-1.0, -0.8]], dtype=torch.float64)
    sim = ValleySGD(data, lr=0.05, batch_size=5, start=start, num_chains=3, seed=7)
    gen = torch.Generator().manual_seed(7)  # the same draws as the chains
    w = start.clone()
    for _ in range(20):
        rows = torch.randint(data.size, (3, 5), generator=gen)
        w = torch.stack([w[r] - 0.05 * torch.func.grad(lambda v: per_sample_loss(data, v, rows[r]))(w[r]) for r in range(3)])
        sim.step()
    assert torch.allclose(sim.w, w, atol=1e-12)


def test_one_step_scales_the_valley_position_exactly(data):
    w0 = torch.tensor([1.7, 0.4], dtype=torch.float64)
    sim = ValleySGD(data, lr=0.1, batch_size=3, start=w0, num_chains=4, seed=1)
    A, C = ValleySGD(data, lr=0.1, batch_size=3, start=w0, num_chains=4, seed=1).coefficients()
    sim.step()
    g = A * (w0[0] * w0[1]) - C
    assert torch.allclose(valley_position(sim.w), valley_position(w0) * (1 - 0.01 * g ** 2), rtol=1e-13)


def test_gd_stays_at_its_valley_position_and_sgd_drifts_to_the_flat_point(data):
    on_valley = valley_point(data, 6.0)
    gd = ValleySGD(data, lr=0.1, batch_size=None, start=on_valley, num_chains=1)
    gd.run(500)
    assert torch.allclose(gd.w[0], on_valley, atol=1e-12)
    off = on_valley * torch.tensor([0.8, 0.9], dtype=torch.float64)  # u = 0.72 b*: below the valley
    gd = ValleySGD(data, lr=0.1, batch_size=None, start=off, num_chains=1)
    gd.run(2000)
    assert abs(float(gd.w[0, 0] * gd.w[0, 1]) - data.valley) < 1e-10  # on the valley ...
    D0, D_gd = float(valley_position(off)), float(valley_position(gd.w[0]))
    assert abs(D_gd / D0 - 1) < 0.01  # ... where its start projects (D conserved up to O(lr^2))
    sgd = ValleySGD(data, lr=0.1, batch_size=1, start=off, num_chains=200, seed=2)
    sgd.run(2000)
    D_sgd = valley_position(sgd.w)
    assert float(D_sgd.abs().median()) < 0.05 * D0  # SGD: close to the balanced point
    assert float(valley_sharpness(data, D_sgd).median()) < 1.05 * data.min_sharpness() < float(valley_sharpness(data, D_gd))


def test_effective_loss_gives_the_continuous_drift_on_the_valley(data):
    """GD on L + (lr/4) E|grad l_mu - grad L|^2 moves D by -lr^2 sigma_v^2 D per step on the valley."""
    lr, B = 0.07, 3
    for lam in (2.5, 5.0, 9.0):
        w = valley_point(data, lam).requires_grad_(True)
        grad = torch.autograd.grad(effective_loss(data, w, lr, B), w)[0]
        with torch.no_grad():
            step = -lr * (torch.stack([2 * w[0], -2 * w[1]]) * grad).sum()
            want = -lr * lr * data.valley_variance(B) * valley_position(w)
        assert abs(float(step / want) - 1) < 1e-10
    assert float(effective_loss(data, valley_point(data, 3.0), lr, None)) == pytest.approx(float(loss(data, valley_point(data, 3.0))))


@pytest.mark.parametrize("lr,B", [(0.1, 1), (0.05, 4)])
def test_theory_path_tracks_the_chains_mean_valley_position(data, lr, B):
    start = valley_point(data, 4 * data.min_sharpness())
    steps = 600
    sim = ValleySGD(data, lr=lr, batch_size=B, start=start, num_chains=2000, seed=5)
    mean_D = torch.tensor(sim.run(steps, record_every=50, record=lambda s: float(valley_position(s.w).mean())))
    path = torch.tensor(theory_path(data, lr, B, float(valley_position(start)), steps)[::50])
    rel = (mean_D / path - 1).abs()
    assert float(rel.max()) < 0.05, rel
    # the continuous-time rate alone (no transverse factor) misses by several times more
    ito = float(valley_position(start)) * (1 - lr * lr * data.valley_variance(B)) ** torch.arange(0, steps + 1, 50)
    assert float((mean_D[-1] / ito[-1] - 1).abs()) > 3 * float(rel[-1]) + 0.05


def test_drift_rate_grows_with_lr_and_batch_variance_and_blows_up_at_the_edge(data):
    S = 4.0
    assert drift_rate(data, 0.1, 1, S) > drift_rate(data, 0.05, 1, S) > drift_rate(data, 0.05, 4, S) > 0
    assert drift_rate(data, 0.1, None, S) == 0
    assert math.isinf(float(drift_rate(data, 0.6, 1, S)))  # lr E[A^2] S > 2 a_bar
    assert first_below([5.0, 3.0, 1.0, 0.5], 1.0) == 2 and first_below([5.0, 3.0], 1.0) is None


def test_collapse_bound_separates_chains_that_stay_from_chains_that_collapse(data):
    lr, B = 0.1, 1
    bound = collapse_bound(data, lr, B, samples=50_000)
    assert bound is not None and 1 < bound < 20
    assert max(origin_exponents(data.with_noise_scale(0.5 * bound), lr, B, samples=50_000)) > 0
    assert max(origin_exponents(data.with_noise_scale(2 * bound), lr, B, samples=50_000)) < 0
    start = valley_point(data, 2 * data.min_sharpness())
    ends = {}
    for factor in (0.5, 2.0):
        sim = ValleySGD(data.with_noise_scale(factor * bound), lr, B, start, num_chains=300, seed=4)
        sim.run(2000)
        S = (sim.w ** 2).sum(1)
        ends[factor] = float(((S < 1e-3) | sim.diverged).double().mean())  # collapsed to w = 0 or diverged
    assert ends[0.5] < 0.05 and ends[2.0] > 0.8, ends
    assert collapse_bound(data, lr, None) is None


def test_bad_input_is_refused(data):
    with pytest.raises(ValueError, match="positive"):
        ValleyData(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="same length"):
        ValleyData(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        ValleyData(torch.ones(2), torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="batch_size"):
        ValleySGD(data, 0.1, 0, torch.ones(2))
    with pytest.raises(ValueError, match="start"):
        ValleySGD(data, 0.1, 1, torch.ones(3))
    with pytest.raises(ValueError, match="lr"):
        ValleySGD(data, -0.1, 1, torch.ones(2))

"""Nudged SGD (Jastrzębski et al. 2019) against hand-computed updates on a quadratic with known eigenvectors."""
import pytest
import torch

from landscape_kernels.training.optim import NSGD, build_optimizer


def quadratic(seed=0, P=6):
    """0.5 theta^T A theta with A = Q diag(lam) Q^T: known eigenvectors Q."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))[0]
    lam = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)[:P]
    return Q @ torch.diag(lam) @ Q.T, Q, torch.randn(P, generator=g, dtype=torch.float64)


def take_steps(opt, params, A, n):
    for _ in range(n):
        opt.zero_grad()
        theta = torch.cat([p.reshape(-1) for p in params])
        (0.5 * theta @ A @ theta).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("gamma", [0.01, 0.5, 1.0, 5.0])
def test_one_step_without_momentum_scales_the_top_k_part(gamma):
    A, Q, theta0 = quadratic()
    params = [theta0[:2].clone().requires_grad_(), theta0[2:].clone().requires_grad_()]  # two tensors
    opt = NSGD(params, lr=0.05, gamma=gamma, k=2)
    opt.set_subspace(Q[:, :3])  # k = 2: only e_1, e_2 are used
    got = take_steps(opt, params, A, 1)
    g = A @ theta0
    E = Q[:, :2]
    want = theta0 - 0.05 * ((g - E @ (E.T @ g)) + gamma * E @ (E.T @ g))
    assert torch.allclose(got, want, rtol=0, atol=1e-15)
    # along e_1 the step is the SGD step times gamma, outside E it is the SGD step
    sgd = -0.05 * g
    assert torch.allclose(Q[:, 0] @ (got - theta0), gamma * Q[:, 0] @ sgd, atol=1e-15)
    assert torch.allclose(Q[:, 3:].T @ (got - theta0), Q[:, 3:].T @ sgd, atol=1e-15)


@pytest.mark.parametrize("mode", ["correct_v", "correct_g"])
def test_two_steps_with_momentum_follow_the_spec_recursions(mode):
    A, Q, theta0 = quadratic(seed=1)
    params = [theta0.clone().requires_grad_()]
    lr, mu, gamma = 0.03, 0.9, 0.2
    opt = NSGD(params, lr=lr, gamma=gamma, momentum=mu, mode=mode)
    opt.set_subspace(Q[:, :2])
    got = take_steps(opt, params, A, 2)
    E = Q[:, :2]
    nudge = lambda x: x - E @ (E.T @ x) + gamma * E @ (E.T @ x)  # noqa: E731
    theta, m = theta0.clone(), torch.zeros_like(theta0)
    for _ in range(2):
        g = A @ theta
        if mode == "correct_v":
            v = mu * m - lr * g
            theta = theta + nudge(v)
        else:
            v = mu * m - lr * nudge(g)
            theta = theta + v
        m = v
    assert torch.allclose(got, theta, rtol=0, atol=1e-15)


def test_gamma_one_is_plain_sgd_with_momentum():
    A, Q, theta0 = quadratic(seed=2)
    a, b = [theta0.clone().requires_grad_()], [theta0.clone().requires_grad_()]
    nsgd = NSGD(a, lr=0.02, gamma=1.0, momentum=0.5)
    nsgd.set_subspace(Q[:, :3])
    sgd = torch.optim.SGD(b, lr=0.02, momentum=0.5)
    assert torch.allclose(take_steps(nsgd, a, A, 5), take_steps(sgd, b, A, 5), rtol=0, atol=1e-14)


def test_refresh_takes_the_trackers_newest_vectors_and_bad_input():
    A, Q, theta0 = quadratic(seed=3)

    class Tracker:
        vectors, version = None, 0

    tracker = Tracker()
    params = [theta0.clone().requires_grad_()]
    opt = NSGD(params, lr=0.05, gamma=0.0, refresh=tracker)
    take_steps(opt, params, A, 1)
    assert opt.E is None  # no subspace yet: plain SGD
    tracker.vectors, tracker.version = Q[:, :1], 1
    before = params[0].detach().clone()
    after = take_steps(opt, params, A, 1)
    assert torch.allclose(opt.E, Q[:, :1]) and abs(float(Q[:, 0] @ (after - before))) < 1e-15  # gamma 0: frozen along e_1
    with pytest.raises(ValueError, match="mode must be one of"):
        NSGD(params, lr=0.1, mode="nudge")
    with pytest.raises(ValueError, match=r"E must be \(6, K\)"):
        opt.set_subspace(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="fewer than k = 3"):
        NSGD(params, lr=0.1, k=3).set_subspace(Q[:, :2])
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        NSGD(params, lr=0.1, gamma=-1)


def test_build_optimizer_makes_the_named_rule_and_rejects_bad_settings():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    plain = build_optimizer("sgd", [w], 0.1)
    assert isinstance(plain, torch.optim.SGD) and plain.param_groups[0]["momentum"] == 0
    heavy = build_optimizer("momentum", [w], 0.01, momentum=0.8)
    assert heavy.param_groups[0]["momentum"] == 0.8 and heavy.param_groups[0]["weight_decay"] == 0
    adam = build_optimizer("adam", [w], 1e-3, betas=(0.8, 0.99))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.8, 0.99)
    # two heavy-ball steps on L = |w|^2 / 2 (gradient w): v1 = g0, v2 = mu v1 + g1
    w0 = w.detach().clone()
    for _ in range(2):
        heavy.zero_grad()
        (0.5 * w.pow(2).sum()).backward()
        heavy.step()
    w1 = w0 - 0.01 * w0
    assert torch.allclose(w.detach(), w1 - 0.01 * (0.8 * w0 + w1))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("rmsprop", [w], 0.1)
    with pytest.raises(ValueError, match="momentum must lie in"):
        build_optimizer("momentum", [w], 0.1, momentum=1.0)
    with pytest.raises(ValueError, match="betas must be two numbers"):
        build_optimizer("adam", [w], 0.1, betas=(0.9,))

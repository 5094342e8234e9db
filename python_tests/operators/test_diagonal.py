"""Exact diagonals (operators.diagonal) against dense matrices formed independently (jacobians and the
closed-form output Hessians, per-sample autograd), float64, on an MLP, a CNN and a sequence model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels.operators import fisher_diagonal, ggn_diagonal, noise_diagonal
from landscape_kernels.operators import kfac_parameters as lk_kfac_parameters
from landscape_kernels.operators.loss_hessian import exact_columns, mean_loss, monte_carlo_columns
from testing import flat_parameter_function, seed_from, small_mlp, vmap_per_sample_gradients

TOL = 1e-10


class TinySequenceModel(nn.Module):
    """Tokens -> embedding -> a layer mixing the positions -> LayerNorm -> logits over the vocabulary."""

    def __init__(self, vocab=7, dim=5, T=4):
        super().__init__()
        self.embed, self.mix, self.norm, self.out = nn.Embedding(vocab, dim), nn.Linear(T, T), nn.LayerNorm(dim), \
            nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.mix(h.transpose(1, 2)).transpose(1, 2).tanh()
        return self.out(self.norm(h))


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def dense_ggn(model, x, loss, names=None):
    """J^T H J from the full jacobian of the outputs and the closed-form Hessian of the mean loss, in the
    parameters ``names`` (None: all)."""
    f, theta = flat_parameter_function(model, names, x, lambda out: getattr(out, "logits", out))
    out = f(theta).detach()
    J = torch.autograd.functional.jacobian(f, theta).reshape(-1, out.shape[-1], theta.numel())  # rows, C, P
    if loss == "mse":
        H = torch.eye(out.shape[-1], dtype=out.dtype).expand(J.shape[0], -1, -1) * 2.0 / out.numel()
    else:
        p = out.reshape(-1, out.shape[-1]).softmax(1)
        H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / J.shape[0]
    return torch.einsum("rcp,rcd,rdq->pq", J, H, J)


def problems(gen):
    seed_from(gen)
    mlp = small_mlp((6, 5, 3), nn.Tanh)
    x = torch.randn(13, 6, dtype=torch.float64, generator=gen)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    xi = torch.randn(9, 1, 4, 4, dtype=torch.float64, generator=gen)
    seq = TinySequenceModel().double()
    tokens = torch.randint(0, 7, (5, 4), generator=gen)
    return {"mlp": (mlp, x, torch.randint(0, 3, (13,), generator=gen)),
            "cnn": (cnn, xi, torch.randint(0, 3, (9,), generator=gen)),
            "sequence": (seq, tokens, tokens)}


@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequence"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_diagonal_is_the_dense_ggns(kind, loss, gen):
    model, x, y = problems(gen)[kind]
    if loss == "mse":
        with torch.no_grad():
            y = torch.randn(model(x).shape, dtype=torch.float64, generator=gen)
    d = ggn_diagonal(model, (x, y), loss=loss, batch_size=4)
    assert list(d) == [n for n, _ in model.named_parameters()]
    assert all(d[n].shape == p.shape for n, p in model.named_parameters())
    ref = dense_ggn(model, x, loss).diagonal()
    assert (flat(d) - ref).abs().max() <= TOL * ref.abs().max()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fisher_and_noise_diagonals_are_the_per_sample_moments(kind, gen):
    model, x, y = problems(gen)[kind]
    G = vmap_per_sample_gradients(model, x, y)  # (N, P)
    N = G.shape[0]
    fisher = fisher_diagonal(model, F.cross_entropy, (x, y), batch_size=4)
    assert (flat(fisher) - (G ** 2).mean(0)).abs().max() <= TOL * (G ** 2).mean(0).max()
    centred = ((G - G.mean(0)) ** 2).mean(0)
    noise = noise_diagonal(model, F.cross_entropy, (x, y), batch_size=5)
    assert (flat(noise) - centred).abs().max() <= TOL * centred.max()
    sgd = noise_diagonal(model, F.cross_entropy, (x, y), sgd_batch_size=4, without_replacement=True)
    assert torch.allclose(flat(sgd), centred / 4 * (N - 4) / (N - 1), rtol=1e-9, atol=0)


def test_ggn_diagonal_of_gpt2():
    """A tiny GPT-2 (Conv1D projections, attention, LayerNorms, the tied embedding) against its dense GGN."""
    from real_models import build

    case = build("gpt2")
    names = ["transformer.wte.weight", "transformer.h.1.ln_2.weight", "transformer.h.1.mlp.c_proj.weight",
             "transformer.ln_f.bias"]
    d = ggn_diagonal(case.model, (case.inputs, case.targets), params=names)
    ref = dense_ggn(case.model, case.inputs, "cross_entropy", names).diagonal()
    assert (flat(d) - ref).abs().max() <= TOL * ref.abs().max()


class TiedOutput(nn.Module):
    """An output layer whose weight is also the input embedding, named after the Linear (as a tied LM head
    can be): the recorded-layer path must leave it to the per-sample capture, which sees both uses."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(5, 7, bias=False)
        self.mid = nn.Linear(5, 5)
        self.embed = nn.Embedding(7, 5)
        self.embed.weight = self.out.weight

    def forward(self, tokens):
        return self.out(self.mid(self.embed(tokens)).tanh())


def test_a_weight_shared_between_modules(gen):
    seed_from(gen)
    model = TiedOutput().double()
    tokens = torch.randint(0, 7, (6, 3), generator=gen)
    assert [n for n, _ in model.named_parameters()] == ["out.weight", "mid.weight", "mid.bias"]
    assert lk_kfac_parameters(model) == ["mid.weight", "mid.bias"]
    d = ggn_diagonal(model, (tokens, tokens))
    ref = dense_ggn(model, tokens, "cross_entropy").diagonal()
    assert (flat(d) - ref).abs().max() <= TOL * ref.abs().max()


def test_a_chosen_subset_of_parameters(gen):
    model, x, y = problems(gen)["mlp"]
    names = [n for n, _ in model.named_parameters()][-2:]
    d = ggn_diagonal(model, (x, y), params=names)
    assert list(d) == names
    full = ggn_diagonal(model, (x, y))
    assert all(torch.allclose(d[n], full[n], rtol=1e-12, atol=0) for n in names)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_output_hessian_columns(loss, gen):
    """sum_k s_k s_k^T is the Hessian of the mean loss in the outputs within each sample (products of two
    samples never meet: the per-sample capture keeps them apart); the Monte-Carlo columns average to it."""
    out = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (3, 2), generator=gen) if loss == "cross_entropy" else torch.randn(3, 2, 4, generator=gen,
                                                                                            dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda o: mean_loss(loss)(o, y), out).reshape(24, 24)
    index = torch.arange(24)
    same_sample = (index[:, None] // 8) == (index[None, :] // 8)
    same_row = (index[:, None] // 4) == (index[None, :] // 4)
    for per_position, where in ((True, same_sample), (False, same_row)):
        S = torch.stack([c.reshape(-1) for c in exact_columns(loss, out, per_position=per_position)], 1)
        assert torch.allclose((S @ S.T)[where], H[where], rtol=0, atol=1e-14)
    S = torch.stack([c.reshape(-1) for c in monte_carlo_columns(loss, out, 20000, torch.Generator().manual_seed(0))], 1)
    assert ((S @ S.T)[same_row] - H[same_row]).abs().max() < 0.05 * H.abs().max()


def test_bad_loss_is_named(gen):
    model, x, y = problems(gen)["mlp"]
    with pytest.raises(ValueError, match="loss must be one of"):
        ggn_diagonal(model, (x, y), loss="hinge")

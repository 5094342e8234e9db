"""PerSampleGradients against per-sample gradients from torch.func.vmap(grad) on real small models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape_kernels import PerSampleGradients, ops
from testing import DEVICE_BACKENDS, assert_close, seed_from, small_mlp, vmap_per_sample_gradients


class SeqModel(nn.Module):
    """Linear layers on (B, T, in) inputs, a shared layer applied twice, mean over positions."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 7)
        self.shared = nn.Linear(7, 7, bias=False)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h).mean(1)


class Grid4d(nn.Module):
    """A Linear on a 4-D input (B, T1, T2, in)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).sum((1, 2))


def mlp():
    return small_mlp((6, 5, 4, 3), bias=(True, False, True), dtype=torch.float32)


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2), bias=False), nn.ReLU(),
        nn.Conv2d(4, 2, 2, padding="same", dilation=1), nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
    )


MODELS = {
    "mlp": (mlp, lambda g: torch.randn(9, 6, generator=g)),
    "cnn": (cnn, lambda g: torch.randn(7, 2, 7, 7, generator=g)),
    "seq": (SeqModel, lambda g: torch.randn(6, 4, 5, generator=g)),
    "grid4d": (Grid4d, lambda g: torch.randn(5, 2, 3, 4, generator=g)),
}


def build(name, gen, dtype=torch.float64, device="cpu"):
    seed_from(gen)
    make_model, make_x = MODELS[name]
    model = make_model().to(dtype=dtype, device=device)
    x = make_x(gen).to(dtype=dtype, device=device)
    y = torch.randint(0, 3, (x.shape[0],), generator=gen).to(device)
    return model, x, y


def capture(model, x, y, reduction, **kwargs):
    ps = PerSampleGradients(model, loss_reduction=reduction, **kwargs)
    with ps:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
    return ps


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_statistics_match_vmap(model_name, reduction, device, backend, gen):
    model, x, y = build(model_name, gen, device=device)
    with ops.use_backend(backend):
        ps = capture(model, x, y, reduction)
        G = vmap_per_sample_gradients(model, x, y, ps.param_names)
        B, P = G.shape
        assert ps.num_params == P and ps.batch_size == B
        tol = torch.float64
        assert_close(ps.sq_norms(), G.square().sum(1), tol, what="sq_norms")
        assert_close(ps.gram(), G @ G.T, tol, what="gram")
        mean = torch.cat([m.flatten() for m in ps.mean().values()])
        var = torch.cat([v.flatten() for v in ps.variance().values()])
        assert_close(mean, G.mean(0), tol, what="mean")
        assert_close(var, G.var(0, unbiased=False), tol, what="variance")
        var1 = torch.cat([v.flatten() for v in ps.variance(correction=1).values()])
        assert_close(var1, G.var(0, unbiased=True), tol, what="variance(correction=1)")
        V = torch.randn(3, P, dtype=G.dtype, device=device, generator=None)
        assert_close(ps.project(V), G @ V.T, tol, what="project")
        C1 = (G - G.mean(0)).T @ (G - G.mean(0)) / B
        assert_close(ps.cov_matvec(V), V @ C1, tol, what="cov_matvec (flat)")
        W = torch.randn(B, 2, dtype=G.dtype, device=device)
        ws = ps.weighted_sum(W)
        assert_close(torch.cat([ws[n].reshape(2, -1) for n in ps.param_names], 1), W.T @ G, tol, what="weighted_sum")
        # dict in, dict out, same numbers
        as_dict = {n: v.reshape(3, *ps.param_shapes[n]) for n, v in zip(ps.param_names, V.split(
            [int(torch.Size(ps.param_shapes[n]).numel()) for n in ps.param_names], 1))}
        out = ps.cov_matvec(as_dict)
        assert list(out) == ps.param_names
        assert_close(torch.cat([out[n].reshape(3, -1) for n in ps.param_names], 1), V @ C1, tol, what="cov_matvec (dict)")
        # all four together, in one pass per layer, and the caches it fills
        together = ps.stats()
        assert_close(together["gram"], G @ G.T, tol, what="stats() gram")
        assert_close(together["sq_norms"], G.square().sum(1), tol, what="stats() sq_norms")
        var_t = torch.cat([together["variance"][n].flatten() for n in ps.param_names])
        assert_close(var_t, G.var(0, unbiased=False), tol, what="stats() variance")
        assert_close(ps.gram(), G @ G.T, tol, what="gram after stats()")
        # the parameter shapes are kept
        for n, p in model.named_parameters():
            assert ps.mean()[n].shape == p.shape and ps.variance()[n].shape == p.shape


def test_mean_reduction_and_sum_reduction_agree(gen):
    model, x, y = build("mlp", gen)
    a = capture(model, x, y, "mean").sq_norms()
    b = capture(model, x, y, "sum").sq_norms()
    assert_close(a, b, torch.float64, what="reduction independence")


def test_float32_model(gen):
    model, x, y = build("cnn", gen, dtype=torch.float32)
    ps = capture(model, x, y, "mean")
    model64 = build("cnn", gen)[0]
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    G = vmap_per_sample_gradients(model64, x.double(), y, ps.param_names)
    assert ps.sq_norms().dtype == torch.float32
    assert_close(ps.sq_norms(), G.square().sum(1), torch.float32, factor=10, what="float32 sq_norms")
    var = torch.cat([v.flatten() for v in ps.variance().values()])
    assert_close(var, G.var(0, unbiased=False), torch.float32, factor=10, what="float32 variance")


def test_layer_subset_and_per_layer_statistics(gen):
    model, x, y = build("mlp", gen)
    ps = PerSampleGradients(model, layers=["0", model[4]])
    with ps:
        F.cross_entropy(model(x), y).backward()
    assert ps.param_names == ["0.weight", "0.bias", "4.weight", "4.bias"]
    G = vmap_per_sample_gradients(model, x, y, ps.param_names)
    assert_close(ps.sq_norms(), G.square().sum(1), torch.float64)
    first = G[:, : 6 * 5 + 5]
    assert_close(ps.sq_norms(layer="0"), first.square().sum(1), torch.float64)
    assert_close(ps.gram(layer="0"), first @ first.T, torch.float64)
    with pytest.raises(ValueError, match="not among the hooked layers"):
        ps.sq_norms(layer="2")


class Scale(nn.Module):
    """A module no rule is registered for: a bare parameter multiplying the activations."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.scale


def test_vmap_fallback_for_unsupported_layers(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), Scale(5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    ps = PerSampleGradients(model, fallback="vmap", vmap_chunk_size=3)
    ps.compute(lambda out, t: F.cross_entropy(out, t), x, y)
    assert ps.param_names == ["0.weight", "0.bias", "1.scale", "3.weight", "3.bias"]
    assert ps.layer_names == ["0", "3"]  # 1.scale goes through the fallback
    G = vmap_per_sample_gradients(model, x, y, ps.param_names)
    assert_close(ps.sq_norms(), G.square().sum(1), torch.float64, what="sq_norms with fallback")
    assert_close(ps.gram(), G @ G.T, torch.float64, what="gram with fallback")
    var = torch.cat([ps.variance()[n].flatten() for n in ps.param_names])
    assert_close(var, G.var(0, unbiased=False), torch.float64, what="variance with fallback")
    V = torch.randn(2, G.shape[1], dtype=torch.float64, generator=gen)
    C1 = (G - G.mean(0)).T @ (G - G.mean(0)) / G.shape[0]
    assert_close(ps.cov_matvec(V), V @ C1, torch.float64, what="cov_matvec with fallback")
    assert all(p.grad is None for p in model.parameters())  # compute() leaves .grad alone


def test_unsupported_layer_is_listed():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Embedding(5, 4, max_norm=1.0))
    model.eval()
    with pytest.raises(ValueError, match=r"1 \(BatchNorm normalising with batch statistics.*1.weight, 1.bias\).*max_norm.*"
                                         r"fallback='vmap'"):
        PerSampleGradients(model)


def test_fallback_needs_compute(gen):
    model = nn.Sequential(nn.Linear(4, 4), Scale(4))
    ps = PerSampleGradients(model, fallback="vmap")
    with ps:
        model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="needs the loss: take the statistics through compute"):
        ps.sq_norms()


def test_errors_name_what_is_wrong(gen):
    model, x, y = build("mlp", gen)
    ps = PerSampleGradients(model)
    with ps:
        model(x)
    with pytest.raises(RuntimeError, match="received no output gradient: call loss.backward"):
        ps.sq_norms()
    with ps:
        pass
    with pytest.raises(RuntimeError, match="recorded no forward pass"):
        ps.gram()
    with ps:
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match="after the `with` block"):
            ps.sq_norms()
    with pytest.raises(ValueError, match="flat vectors must have shape"):
        ps.project(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="missing"):
        ps.project({"0.weight": torch.randn(1, 5, 6, dtype=torch.float64)})
    with pytest.raises(TypeError, match="must be a dict"):
        ps.project([1, 2])
    with pytest.raises(ValueError, match="correction must be in"):
        ps.variance(correction=9)
    with pytest.raises(ValueError, match="loss_reduction must be"):
        PerSampleGradients(model, loss_reduction="batchmean")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        PerSampleGradients(lambda x: x)
    with pytest.raises(ValueError, match="not a module of the model"):
        PerSampleGradients(model, layers=["nope"])


def test_nan_input_is_reported_with_the_layer(gen):
    model, x, y = build("mlp", gen)
    x[2, 1] = float("nan")
    ps = capture(model, x, y, "mean")
    with pytest.raises(ValueError, match="inputs recorded at layer '0' contains 1 NaN"):
        ps.sq_norms()


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].requires_grad_(False)
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        with PerSampleGradients(model):
            pass
    model.eval()
    with PerSampleGradients(model):
        pass


def test_a_model_called_with_keyword_arguments_is_captured(gen):
    # m(input=x): the layer hooks see no positional input; the statistics must still be those of m(x)
    seed_from(gen)
    model = small_mlp([5, 4, 3])
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    with PerSampleGradients(model, loss_reduction="sum") as ps:
        F.cross_entropy(model(input=x), y, reduction="sum").backward()
    G = vmap_per_sample_gradients(model, x, y, ps.param_names)  # gradients of the per-sample losses (sum)
    assert_close(ps.sq_norms(), G.square().sum(1), torch.float64, what="sq_norms")
    assert_close(ps.gram(), G @ G.T, torch.float64, what="gram")

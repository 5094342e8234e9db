"""Per-sample statistics of a small GPT-style model built from torch.nn modules (Embedding, LayerNorm,
3-D Linear attention projections and MLP blocks, scaled_dot_product_attention) against torch.func."""
import pytest
import torch
import torch.nn as nn

from landscape_kernels import PerSampleGradients
from landscape_kernels.training.models import gpt, lm_loss
from testing import vmap_per_sample_gradients

# the torch.func oracle vmaps scaled_dot_product_attention, which has no batching rule (a slow fallback)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def TinyGPT(vocab=19, d=16, heads=2, layers=2, context=7, padding_idx=None):
    model = gpt(vocab, d, heads, layers, context)
    if padding_idx is not None:
        model.tok.padding_idx = padding_idx
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_gpt_style_model_per_sample_statistics_match_torch_func(dtype, padding_idx):
    torch.manual_seed(0)
    model = TinyGPT(padding_idx=padding_idx).to(dtype)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    B, T = 5, 7
    idx, targets = torch.randint(0, 19, (B, T)), torch.randint(0, 19, (B, T))
    idx[0, :3] = 0  # repeated tokens (and padding, when padding_idx = 0)
    ps = PerSampleGradients(model)
    with ps:
        lm_loss(model(idx), targets).backward()
    G = vmap_per_sample_gradients(model, idx, targets, loss_fn=lm_loss)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(ps.sq_norms(), G.square().sum(1), **tol)
    torch.testing.assert_close(ps.gram(), G @ G.T, **tol)
    V = torch.randn(3, G.shape[1], dtype=dtype)
    torch.testing.assert_close(ps.project(V), G @ V.T, **tol)
    var = torch.cat([v.reshape(-1) for v in ps.variance().values()])
    torch.testing.assert_close(var, G.var(0, unbiased=False), **tol)
    assert set(ps.layer_names) >= {"tok", "pos", "ln_f", "blocks.0.ln1", "blocks.1.qkv", "blocks.0.mlp.0"}


def test_unbatched_position_indices_are_one_clear_error():
    emb, head = nn.Embedding(7, 4), nn.Linear(4, 3)
    model = nn.ModuleDict({"pos": emb, "head": head})
    ps = PerSampleGradients(model)
    with ps:
        out = head(torch.randn(2, 7, 4) + emb(torch.arange(7)))
        out.sum().backward()
    with pytest.raises(ValueError, match="positions.expand"):
        ps.sq_norms()


def test_embedding_with_max_norm_is_named_as_unsupported():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Embedding with max_norm"):
        PerSampleGradients(model)


def test_hessian_of_an_attention_model_switches_to_the_math_attention_backend():
    from landscape_kernels import HessianOperator

    torch.manual_seed(1)
    model = TinyGPT(layers=1).double()
    idx, targets = torch.randint(0, 19, (3, 7)), torch.randint(0, 19, (3, 7))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="pass math_attention=True"):  # switching it off gives the error
        HessianOperator(model, lm_loss, (idx, targets), math_attention=False).matmat(V)
    auto = HessianOperator(model, lm_loss, (idx, targets))
    exact = HessianOperator(model, lm_loss, (idx, targets), math_attention=True).matmat(V)
    torch.testing.assert_close(auto.matmat(V), exact, rtol=1e-12, atol=1e-13)
    assert auto.math_attention is True  # it switched after the first product needed it
    fwd = HessianOperator(model, lm_loss, (idx, targets), method="forward_over_reverse", math_attention=True).matmat(V)
    fd = HessianOperator(model, lm_loss, (idx, targets), method="finite_difference").matmat(V)
    torch.testing.assert_close(fwd, exact, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fd, exact, rtol=1e-7, atol=1e-9)


def test_the_failed_fused_attention_attempt_is_freed_before_the_retry():
    """The retry on the math backend runs once the failed attempt's traceback (and with it the
    attempt's gradient graph) is gone: the first product's peak memory holds one graph, not two."""
    import weakref

    from landscape_kernels import HessianOperator

    model = TinyGPT(layers=1).double()
    op = HessianOperator(model, lm_loss, (torch.randint(0, 19, (3, 7)), torch.randint(0, 19, (3, 7))))
    first_graph = []

    def product():
        if not first_graph:
            graph = torch.ones(1000)  # stands for the failed attempt's graph, alive in its frame
            first_graph.append(weakref.ref(graph))
            raise RuntimeError("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward "
                               "is not implemented")
        return first_graph[0]() is None

    assert op.attention_safe(product) is True and op.math_attention is True


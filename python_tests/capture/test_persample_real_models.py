"""Per-sample statistics of the models researchers bring (tiny transformers models from configs, torch.nn
attention and CNN layers; see real_models.py) against B ordinary backward passes, float64: every
parameter covered, every statistic to 1e-8 relative, from the forward and backward a user writes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import landscape_kernels as lk
from landscape_kernels import Factors, PerSampleGradients
from real_models import TORCH, TRANSFORMERS, build, lm_loss
from testing import loop_per_sample_gradients, rel_err

# the sample-VJP rule vmaps scaled_dot_product_attention, which has no batching rule (a slow fallback)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

# transformers' Llama RMS norm computes in float32 whatever the model's dtype, forward and backward: every
# gradient of a float64 Llama carries float32 rounding, and the batch's backward and a per-sample backward
# round differently (measured 2e-8 to 1e-7 relative). "llama_float64_norms" (the same model with norms that
# compute in its dtype) holds the architecture to 1e-8.
TOLERANCE = {"llama": 1e-6}


def forward(case):
    """What a user writes: model(x) or model(**inputs), and the logits of a transformers output."""
    out = case.model(**case.inputs) if isinstance(case.inputs, dict) else case.model(case.inputs)
    return out.logits if hasattr(out, "logits") else out


def recorded(model, loss_fn, x, y):
    """(statistics of one ordinary forward and backward, the oracle's per-sample gradients)."""
    ps = PerSampleGradients(model)
    with ps:
        loss_fn(model(x), y).backward()
    return ps, loop_per_sample_gradients(model, loss_fn, x, y, ps.param_names)


def assert_statistics_match(ps, G, tol):
    assert rel_err(ps.sq_norms(), G.square().sum(1)) <= tol
    assert rel_err(ps.gram(), G @ G.T) <= tol
    mean = torch.cat([ps.mean()[n].reshape(-1) for n in ps.param_names])
    assert rel_err(mean, G.mean(0)) <= tol
    var = torch.cat([ps.variance()[n].reshape(-1) for n in ps.param_names])
    assert rel_err(var, G.var(0, unbiased=False)) <= tol
    V = torch.randn(2, G.shape[1], dtype=G.dtype, generator=torch.Generator().manual_seed(5))
    assert rel_err(ps.project(V), G @ V.T) <= tol
    Gc = G - G.mean(0)
    assert rel_err(ps.cov_matvec(V), V @ (Gc.T @ Gc) / G.shape[0]) <= tol


@pytest.mark.parametrize("name", TRANSFORMERS + TORCH)
def test_every_statistic_of_every_parameter_matches_per_sample_autograd(name):
    case = build(name)
    ps = PerSampleGradients(case.model)
    with ps:
        case.loss_fn(forward(case), case.targets).backward()
    trainable = [n for n, p in case.model.named_parameters() if p.requires_grad]
    assert ps.param_names == trainable  # every parameter, tied ones once
    G = loop_per_sample_gradients(case.model, case.loss_fn, case.inputs, case.targets, ps.param_names)
    assert_statistics_match(ps, G, TOLERANCE.get(name, 1e-8))


@pytest.mark.parametrize("name", ["gpt2", "bert", "encoder"])
def test_compute_takes_dict_and_tensor_inputs_and_leaves_grad_alone(name):
    case = build(name)
    ps = PerSampleGradients(case.model)
    ps.compute(case.loss_fn, case.inputs, case.targets)
    assert all(p.grad is None for p in case.model.parameters())
    G = loop_per_sample_gradients(case.model, case.loss_fn, case.inputs, case.targets, ps.param_names)
    assert rel_err(ps.sq_norms(), G.square().sum(1)) <= 1e-8


def test_gpt2_tied_embedding_gets_the_sum_of_its_two_uses():
    case = build("gpt2")
    model = case.model
    assert model.lm_head.weight is model.transformer.wte.weight
    ps = PerSampleGradients(model, params=["transformer.wte.weight"])
    with ps:
        case.loss_fn(forward(case), case.targets).backward()
    assert set(ps.layer_names) == {"transformer.wte", "lm_head"}
    G = loop_per_sample_gradients(model, case.loss_fn, case.inputs, case.targets, ["transformer.wte.weight"])
    assert rel_err(ps.sq_norms(), G.square().sum(1)) <= 1e-10
    assert rel_err(ps.sq_norms(layer="lm_head"), G.square().sum(1)) <= 1e-10  # the layer filter keeps the block


def test_bert_position_ids_shared_by_the_batch_keep_the_samples_apart():
    case = build("bert")
    ps = PerSampleGradients(case.model, layers=["bert.embeddings.position_embeddings"])
    with ps:
        case.loss_fn(forward(case), case.targets).backward()
    G = loop_per_sample_gradients(case.model, case.loss_fn, case.inputs, case.targets, ps.param_names)
    assert rel_err(ps.gram(), G @ G.T) <= 1e-10


def test_one_dimensional_position_ids_are_widened_inside_the_model():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(5, 4), nn.Linear(4, 3)

        def forward(self, idx):
            return self.head(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))  # (T,) positions

    ps, G = recorded(Positions().double(), lm_loss, torch.randint(0, 9, (3, 5)), torch.randint(0, 3, (3, 5)))
    assert rel_err(ps.gram(), G @ G.T) <= 1e-10


class TiedProjection(nn.Module):
    """Reads a weight tied to an embedding through its own forward (a module without a rule)."""

    def __init__(self, embedding):
        super().__init__()
        self.weight = embedding.weight

    def forward(self, h):
        return h @ self.weight.T


def _tied_model_with_buffers():
    torch.manual_seed(0)
    emb = nn.Embedding(11, 6)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(6 * 4, 6), nn.BatchNorm1d(6), TiedProjection(emb)).double()
    with torch.no_grad():
        model[3].running_mean.uniform_(-1, 1)
        model[3].running_var.uniform_(0.5, 2)
    return model.eval()


def test_vmap_fallback_handles_tied_weights_and_buffers():
    model = _tied_model_with_buffers()
    x, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5,))
    ps = PerSampleGradients(model, fallback="vmap")
    ps.compute(F.cross_entropy, x, y)
    assert ps.layer_names == ["2", "3"]  # the tied embedding weight is taken entirely by the fallback
    G = loop_per_sample_gradients(model, F.cross_entropy, x, y, ps.param_names)
    assert_statistics_match(ps, G, 1e-10)
    exact = PerSampleGradients(model)  # the default: the checked per-sample VJP rule for TiedProjection
    exact.compute(F.cross_entropy, x, y)
    assert rel_err(exact.sq_norms(), G.square().sum(1)) <= 1e-10


@pytest.mark.parametrize("name, module", [("vit", "vit.embeddings"), ("opt", "model.decoder.embed_positions")])
def test_vmap_fallback_on_transformers_models(name, module):
    """ViT's class token and position embeddings, OPT's learned positions (an Embedding subclass with its
    own forward) go to the whole-model torch.func fallback when asked."""
    case = build(name)
    ps = PerSampleGradients(case.model, fallback="vmap")
    ps.compute(case.loss_fn, case.inputs, case.targets)
    assert module not in ps.layer_names  # its parameters went to the fallback (OPT: one backward per sample)
    G = loop_per_sample_gradients(case.model, case.loss_fn, case.inputs, case.targets, ps.param_names)
    assert rel_err(ps.sq_norms(), G.square().sum(1)) <= 1e-8
    G = loop_per_sample_gradients(case.model, case.loss_fn, case.inputs, case.targets, ps.param_names)
    assert rel_err(ps.sq_norms(), G.square().sum(1)) <= 1e-8


def test_a_use_no_rule_saw_is_an_error_not_a_wrong_result():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(self.a(x) + F.linear(x, self.a.weight))  # a second, functional use of a.weight

    model = Functional().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ps = PerSampleGradients(model)
    with ps:
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"do not add up to the batch gradient .*a\.weight"):
        ps.sq_norms()
    through_compute = PerSampleGradients(model)
    through_compute.compute(F.cross_entropy, x, y)
    with pytest.raises(RuntimeError, match="do not add up"):
        through_compute.gram()


def test_compute_inside_a_with_block_and_two_forwards_are_errors():
    """The 4x error of earlier versions: compute() inside `with` hooked every layer twice."""
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 4)).double()
    x, y = torch.randn(5, 2, 8, dtype=torch.float64), torch.randint(0, 4, (5,))
    ps = PerSampleGradients(model)
    with ps:
        with pytest.raises(RuntimeError, match="already recording"):
            ps.compute(F.cross_entropy, x, y)
    with ps:
        model(x)  # e.g. a logging forward
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="2 forward passes"):
        ps.sq_norms()
    ps.compute(F.cross_entropy, x, y)
    G = loop_per_sample_gradients(model, F.cross_entropy, x, y)
    assert rel_err(ps.sq_norms(layer="3"), G[:, -(18 * 4 + 4):].square().sum(1)) <= 1e-12


class ScaledLinear(nn.Module):
    """A user's layer: y = scale * (x W^T), with a vector scale per output."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n_out))

    def forward(self, x):
        return self.scale * (x @ self.weight.T)


def scaled_linear_rule(module, call):
    x, g = call.input, call.grad  # (B, ..., in), (B, ..., out)
    B = x.shape[0]
    A, D = x.reshape(B, -1, x.shape[-1]), (g * module.scale).reshape(B, -1, g.shape[-1])
    scale = (g * (x @ module.weight.T)).reshape(B, -1, g.shape[-1]).sum(1)  # explicit (B, out)
    return {"weight": Factors(A, D), "scale": scale}


def test_a_registered_user_rule_is_used_and_exact():
    calls = []

    def counted(module, call):
        calls.append(module)
        return scaled_linear_rule(module, call)

    lk.register_per_sample_rule(ScaledLinear, counted)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(ScaledLinear(5, 4), nn.Tanh(), ScaledLinear(4, 3)).double()
        x, y = torch.randn(6, 7, 5, dtype=torch.float64), torch.randint(0, 3, (6, 7))
        ps, G = recorded(model, lm_loss, x, y)
        assert_statistics_match(ps, G, 1e-10)
        assert len(calls) == 2
    finally:
        lk.register_per_sample_rule(ScaledLinear, None)
    ps = PerSampleGradients(model)  # without the rule: the checked per-sample VJP gives the same
    ps.compute(lm_loss, x, y)
    assert rel_err(ps.gram(), G @ G.T) <= 1e-10


def test_a_rule_that_mixes_samples_is_refused_with_the_alternatives():
    class BatchCentred(nn.Module):
        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return (x - x.mean(0)) * self.shift

    model = nn.Sequential(nn.Linear(3, 4), BatchCentred(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    ps = PerSampleGradients(model)
    with ps:
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="no rule for BatchCentred .*register_per_sample_rule.*fallback='vmap'"):
        ps.sq_norms()


def test_a_compiled_model_gives_the_same_statistics():
    case = build("cnn")
    compiled = torch.compile(case.model)
    ps = PerSampleGradients(compiled)
    with ps:
        case.loss_fn(compiled(case.inputs), case.targets).backward()
    G = loop_per_sample_gradients(case.model, case.loss_fn, case.inputs, case.targets)
    assert rel_err(ps.sq_norms(), G.square().sum(1)) <= 1e-8


def test_the_built_in_rules_serve_the_layers_they_are_written_for():
    """The factor and closed-form rules, not the (exact but slower) per-sample VJP, serve the usual layers."""
    from landscape_kernels.capture import layers
    from landscape_kernels.capture.rules import rule_for

    expected = {nn.Linear: layers.linear_rule, nn.Conv1d: layers.conv_rule, nn.Conv2d: layers.conv_rule,
                nn.Conv3d: layers.conv_rule, nn.Embedding: layers.embedding_rule, nn.LayerNorm: layers.layer_norm_rule,
                nn.GroupNorm: layers.group_norm_rule, nn.BatchNorm2d: layers.batch_norm_rule}
    for name in ("cnn", "conv1d", "conv3d", "gpt2", "bert"):
        for module in build(name).model.modules():
            for cls, rule in expected.items():
                if type(module) is cls:
                    assert rule_for(module).fn is rule, (name, cls)
    gpt2 = build("gpt2").model
    assert rule_for(gpt2.transformer.h[0].attn.c_attn).fn is layers.transformers_conv1d_rule
    assert rule_for(nn.ConvTranspose2d(2, 2, 3)) is None  # its own forward: the checked per-sample VJP rule


def test_sequence_first_multihead_attention_with_a_padding_mask():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(8, 2, bias=True, add_bias_kv=True), nn.Linear(8, 3)

        def forward(self, x, pad):
            h = x.transpose(0, 1)  # (T, B, E): batch_first=False
            out, _ = self.attn(h, h, h, key_padding_mask=pad)  # the attention weights are returned too, unused
            return self.head(out.transpose(0, 1).mean(1))

    torch.manual_seed(0)
    model = SeqFirst().double().eval()
    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    pad = torch.zeros(4, 5, dtype=torch.bool)
    pad[1, 3:] = True
    ps = PerSampleGradients(model)
    with ps:
        F.cross_entropy(model(x, pad), y).backward()
    G = loop_per_sample_gradients(model, F.cross_entropy, (x, pad), y, ps.param_names)
    assert "attn.bias_k" in ps.param_names and "attn.out_proj.weight" in ps.param_names
    assert_statistics_match(ps, G, 1e-10)

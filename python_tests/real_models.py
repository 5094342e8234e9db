"""Tiny versions of the models researchers bring, built from configs (no downloads), each with a batch:
``build(name, dtype) -> Case(model, inputs, targets, loss_fn)``. transformers models: GPT-2 (Conv1D
projections, tied input/output embedding, position ids shared by the batch), Llama (RMS norms, rotary
positions, grouped-query attention; also with norms that compute in the model's dtype, see
``_in_dtype_rms_norm``), BERT (dict inputs with a padding mask, token types), ViT (class token
and position embeddings as bare parameters), OPT (learned positions, an Embedding subclass); torch.nn:
a TransformerEncoder (MultiheadAttention), a CNN with BatchNorm in eval mode, GroupNorm and depthwise and
grouped convolutions, a Conv1d network and a Conv3d network."""
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

B, T = 3, 6
TRANSFORMERS = ("gpt2", "llama", "llama_float64_norms", "bert", "vit", "opt")
TORCH = ("encoder", "cnn", "conv1d", "conv3d")


class Case(NamedTuple):
    model: nn.Module
    inputs: object
    targets: torch.Tensor
    loss_fn: Callable


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _perturbed(model):
    """Norm weights and biases moved off their initial 1 and 0, so that their gradients are generic."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _in_dtype_rms_norm(cls):
    """transformers' Llama RMS norm computes in float32 whatever the model's dtype, forward and backward,
    so a float64 Llama's gradients carry float32 rounding (1e-7 relative) wherever they pass a norm, and a
    batch backward and a per-sample backward round differently. This subclass computes in the input's
    dtype, so that the per-sample statistics of the architecture can be checked to float64 accuracy."""

    class InDtypeRMSNorm(cls):
        def forward(self, hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    return InDtypeRMSNorm


def build(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (B, T), generator=g)
    labels = torch.randint(0, 3, (B,), generator=g)
    if name in TRANSFORMERS:
        tf = _transformers()
    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)
        model, case = tf.GPT2LMHeadModel(config), (tokens, tokens, lm_loss)
    elif name in ("llama", "llama_float64_norms"):
        config = tf.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        model, case = tf.LlamaForCausalLM(config), (tokens, tokens, lm_loss)
        if name == "llama_float64_norms":
            for module in model.modules():
                if type(module).__name__ == "LlamaRMSNorm":
                    module.__class__ = _in_dtype_rms_norm(type(module))
    elif name == "bert":
        config = tf.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=24, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, 4:] = 0  # a padded sequence
        types = torch.zeros(B, T, dtype=torch.long)
        types[:, 3:] = 1
        inputs = {"input_ids": tokens, "attention_mask": mask, "token_type_ids": types}
        model, case = tf.BertForSequenceClassification(config), (inputs, labels, F.cross_entropy)
    elif name == "vit":
        config = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=24, num_labels=3)
        model = tf.ViTForImageClassification(config)
        with torch.no_grad():  # the class token and position embeddings start at zero / tiny
            model.vit.embeddings.cls_token.normal_(generator=g)
        case = (torch.randn(B, 3, 8, 8, generator=g), labels, F.cross_entropy)
    elif name == "opt":
        config = tf.OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, ffn_dim=24, num_attention_heads=2,
                              max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :2] = 0  # left padding: the learned positions start later
        model, case = tf.OPTForCausalLM(config), ({"input_ids": tokens, "attention_mask": mask}, tokens, lm_loss)
    elif name == "encoder":
        layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
        model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                              nn.Linear(16 * T, 3))
        case = (torch.randn(B, T, 16, generator=g), labels, F.cross_entropy)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, groups=4, padding="same", padding_mode="reflect"),  # depthwise
            nn.GroupNorm(2, 4), nn.Conv2d(4, 6, 3, groups=2, stride=2), nn.Flatten(), nn.Linear(6 * 3 * 3, 3))
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 2.0)
        case = (torch.randn(B, 3, 8, 8, generator=g), labels, F.cross_entropy)
    elif name == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=2, padding_mode="circular"), nn.ReLU(),
                              nn.Conv1d(3, 3, 2, stride=2, groups=3), nn.Flatten(), nn.Linear(3 * 4, 3))
        case = (torch.randn(B, 2, 8, generator=g), labels, F.cross_entropy)
    elif name == "conv3d":
        model = nn.Sequential(nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=1), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 5 * 3 * 5, 3))
        case = (torch.randn(B, 2, 4, 5, 5, generator=g), labels, F.cross_entropy)
    else:
        raise ValueError(name)
    model = _perturbed(model.to(dtype).eval())
    inputs, targets, loss_fn = case
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()} if isinstance(inputs, dict) \
        else (inputs.to(dtype) if inputs.is_floating_point() else inputs)
    return Case(model, inputs, targets, loss_fn)

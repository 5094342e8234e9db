"""The networks of the reproduced papers.

``mlp`` is the Feng & Tu 2021 network by default (784 -> 50 -> 50 -> 10, ReLU, no biases, PyTorch default
initialisation): an ``nn.Sequential`` whose Linear layers sit at even indices, so the hidden->hidden
matrix W2 is the parameter "2.weight". ``simple_cnn`` is the Jastrzębski et al. 2019 SimpleCNN for 28 x 28 inputs
given as flat (B, 784) rows. Both are plain ``nn.Sequential`` models, so the fast paths of the
operators (R-operator Hessian products) and of ``loss_profiles`` apply to the MLP.
"""
import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(widths=(784, 50, 50, 10), bias=False, activation="relu", seed=None):
    """Fully connected network with the given layer widths (input, hidden..., output).

    ``seed``: the initialisation is drawn from a generator seeded with it (None: the global RNG), so
    two calls with one seed give identical networks without touching the global random state."""
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"mlp: widths must list at least an input and an output width, all >= 1, got {widths}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")

    def build():
        layers = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(n_in, n_out, bias=bias))
        return nn.Sequential(*layers)

    return _seeded(build, seed)


def duality_mlp(widths=(784, 30, 30, 10), dropout=0.0, init_scale=1.0, seed=None):
    """The Feng, Zhang & Tu 2023 network: Linear, ReLU, Dropout(``dropout``), Linear, ReLU, Linear, no
    biases, PyTorch's default initialisation multiplied by ``init_scale``. The analysed hidden matrix is
    "3.weight" (the Dropout sits at index 2 at any rate, so the name does not move)."""
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"duality_mlp: widths must be (input, hidden, hidden, output), all >= 1, got {widths}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"duality_mlp: dropout must be in [0, 1), got {dropout!r}")
    if not float(init_scale) > 0:
        raise ValueError(f"duality_mlp: init_scale must be positive, got {init_scale!r}")

    def build():
        model = nn.Sequential(nn.Linear(widths[0], widths[1], bias=False), nn.ReLU(), nn.Dropout(float(dropout)),
                              nn.Linear(widths[1], widths[2], bias=False), nn.ReLU(),
                              nn.Linear(widths[2], widths[3], bias=False))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(float(init_scale))
        return model

    return _seeded(build, seed)


def simple_cnn(num_classes=10, seed=None):
    """Jastrzębski et al. 2019 SimpleCNN on 28 x 28 images given as (B, 784) rows: 2 x Conv(32, 3) + ReLU, MaxPool 2,
    2 x Conv(64, 3) + ReLU, MaxPool 2, Linear 1024 -> 128 + ReLU, Linear 128 -> ``num_classes``."""
    return _seeded(lambda: nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, num_classes)), seed)


def _seeded(build, seed):
    """``build()`` with PyTorch's default initialisation drawn from the global generator (seed None) or
    from one seeded with ``seed`` inside a forked RNG state (the caller's random stream is untouched)."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (fused q/k/v projection, ``torch.nn.functional.
    scaled_dot_product_attention``) and a 4x GELU MLP, each with a residual connection."""

    def __init__(self, d, heads):
        super().__init__()
        if d % heads:
            raise ValueError(f"gpt: the width d = {d} must be a multiple of heads = {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, -1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-style language model from ``torch.nn`` modules only (no downloads): token and position
    ``nn.Embedding`` (positions given batched, so per-sample statistics see them), ``layers`` pre-norm
    blocks, a final LayerNorm and an untied head. ``forward(idx)`` maps (B, T) token indices to
    (B, T, vocab) logits."""

    def __init__(self, vocab=256, d=128, heads=4, layers=2, context=128):
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        if idx.dim() != 2 or idx.shape[1] > self.context:
            raise ValueError(f"GPT: idx must be (B, T) with T <= context = {self.context}, got {tuple(idx.shape)}")
        positions = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
        return self.head(self.ln_f(self.blocks(self.tok(idx) + self.pos(positions))))


def gpt(vocab=256, d=128, heads=4, layers=2, context=128, seed=None):
    """``GPT`` with a seeded initialisation (see ``mlp``)."""
    return _seeded(lambda: GPT(vocab, d, heads, layers, context), seed)


def lm_loss(logits, targets):
    """Mean next-token cross-entropy over every position of every sequence (per-sample loss: the mean
    over a sequence's positions)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

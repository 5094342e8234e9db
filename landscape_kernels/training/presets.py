"""The built-in models of ``landscape-kernels analyse --preset``: small trained networks that run offline,
each a function returning (model, loss_fn, batches) like a user's ``--model module:function``.

- ``digits_mlp``: 64-64-32-10 ReLU MLP on the embedded 8 x 8 digits;
- ``digits_cnn``: a small CNN on the digits as 1 x 8 x 8 images (Conv2d, BatchNorm2d, ReLU, MaxPool2d,
  Conv2d, ReLU, Flatten, Linear);
- ``gpt2_tiny``: a transformers ``GPT2LMHeadModel`` built from a config (2 layers, width 32, 2 heads; no
  download) trained for next-token prediction on the digits read as token sequences: a class token, then
  the 64 pixel intensities (0-16) row by row.

Each is trained briefly with a fixed seed when called (seconds on 2 cores), so that the analysis looks
at a network that has learnt something; the batches are training samples (all of them for the
digits networks, 64 sequences for the transformer).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .data import load_digits
from .models import lm_loss

PIXEL_LEVELS = 17  # digits pixels are integers 0..16
CLASS_TOKEN = PIXEL_LEVELS  # tokens 17..26: the class of the image, first in its sequence
ANALYSED_SEQUENCES = 64


def _train(model, loss_fn, x, y, steps, lr, batch_size, seed, optimizer="sgd"):
    gen = torch.Generator().manual_seed(seed)
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, y.shape[0], (batch_size,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    return model


def _batches(x, y, batch_size=128):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, y.shape[0], batch_size)]


def digits_mlp(seed=0):
    """(model, loss_fn, batches): a 64-64-32-10 ReLU MLP trained 400 SGD steps on the digits."""
    x, y = load_digits("train")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return _train(model, F.cross_entropy, x, y, 400, 0.05, 32, seed), F.cross_entropy, _batches(x, y)


def digits_cnn(seed=0):
    """(model, loss_fn, batches): a small CNN with BatchNorm trained 300 SGD steps on the digits."""
    x, y = load_digits("train")
    x = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    return _train(model, F.cross_entropy, x, y, 300, 0.05, 32, seed), F.cross_entropy, _batches(x, y)


def digit_sequences(split="train"):
    """The digits as token sequences: (inputs (N, 64), next-token targets (N, 64)) over a vocabulary of
    27 (17 intensities, 10 class tokens); the sequence is the class token and the 64 pixels."""
    x, y = load_digits(split)
    pixels = (x * 16).round().long()
    sequence = torch.cat([(CLASS_TOKEN + y)[:, None], pixels], 1)  # (N, 65)
    return sequence[:, :-1].contiguous(), sequence[:, 1:].contiguous()




def gpt2_tiny(seed=0):
    """(model, loss_fn, batches): a tiny transformers GPT-2 (2 layers, width 32, 2 heads, context 64)
    trained 150 Adam steps on the digit sequences; the analysis batches are the first 64 training
    sequences (4,096 tokens) in batches of 32, so that a full analysis takes minutes on 2 cores."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("the gpt2-tiny preset needs transformers: pip install transformers") from exc
    transformers.logging.set_verbosity_error()
    inputs, targets = digit_sequences("train")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=CLASS_TOKEN + 10, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)

    def loss_of_output(output, t):
        return lm_loss(output.logits if hasattr(output, "logits") else output, t)

    _train(model, loss_of_output, inputs, targets, 150, 3e-3, 32, seed, optimizer="adam")
    return model, lm_loss, _batches(inputs[:ANALYSED_SEQUENCES], targets[:ANALYSED_SEQUENCES], 32)


PRESETS = {"digits-mlp": digits_mlp, "cnn": digits_cnn, "gpt2-tiny": gpt2_tiny}

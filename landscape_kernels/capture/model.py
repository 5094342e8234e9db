"""Model and data plumbing shared by every layer above: which parameters, which batches, which mode.

- ``chosen_parameters(model, params)``: the (names, tensors) an analysis works on, checked.
- ``as_batches(data, batch_size)``: an (inputs, targets) pair or an iterable of batches as a list of
  non-empty batches.
- ``eval_mode(model)``: a context that puts the model in eval mode and restores its previous mode,
  also when the body raises (products and measurements are taken in inference mode).
"""
import contextlib

import torch


def as_batches(data, batch_size=None):
    """A list of (inputs, targets) batches from a (inputs, targets) pair of tensors (cut into
    ``batch_size`` rows, None: one batch) or an iterable of such pairs; empty batches are dropped."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: inputs and targets differ in length: {x.shape[0]} and {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError("data: no samples (an empty dataset)")
        step = batch_size or x.shape[0]
        batches = [(x[i : i + step], y[i : i + step]) for i in range(0, x.shape[0], step)]
    else:
        batches = [tuple(b) for b in data]
    batches = [b for b in batches if b[0].shape[0] > 0]
    if not batches:
        raise ValueError("data: no samples (an empty dataset or only empty batches)")
    return batches


def chosen_parameters(model, params):
    """(names, tensors) of ``params`` (None: every trainable parameter), in the order given."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"params: {missing} are not parameters of the model (it has {list(named)})")
    if not names:
        raise ValueError("params: no parameters chosen")
    if len(set(names)) != len(names):
        raise ValueError(f"params: {names} names a parameter more than once")
    return names, [named[n] for n in names]


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block; its previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

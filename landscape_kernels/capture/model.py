"""Model and data plumbing shared by every layer above: which parameters, which batches, which mode,
and how a model is called.

- ``chosen_parameters(model, params)``: the (names, tensors) an analysis works on, checked.
- ``as_batches(data, batch_size)``: an (inputs, targets) pair or an iterable of batches (a
  ``DataLoader``) as a list of non-empty batches.
- inputs are a tensor (``model(x)``), a tuple or list (``model(*x)``) or a dict (``model(**x)``, the
  usual call of a transformers model): ``batch_size_of``, ``slice_batch`` and ``call_model`` handle the
  three forms; ``model_output`` picks the tensor the loss is taken of (``output_fn``).
- ``eval_mode(model)``: a context that puts the model in eval mode and restores its previous mode,
  also when the body raises (products and measurements are taken in inference mode).
"""
import contextlib
import functools
import inspect

import torch
from torch.func import functional_call


def tensors_in(inputs):
    """The tensors of model inputs or of a module's output, in order: a tensor, or those in a tuple, list
    or dict."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        return [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if isinstance(inputs, (tuple, list)):
        return [v for v in inputs if isinstance(v, torch.Tensor)]
    return []


def batch_size_of(inputs, name="inputs"):
    """The batch size of model inputs: the leading size of the tensor, or of the first tensor of a
    tuple, list or dict."""
    tensors = tensors_in(inputs)
    if not tensors or tensors[0].dim() == 0:
        raise TypeError(f"{name}: expected a tensor, or a tuple/list/dict of tensors with a batch dimension, "
                        f"got {type(inputs).__name__}")
    return tensors[0].shape[0]


def slice_batch(inputs, start, stop):
    """Rows ``start:stop`` of model inputs: every tensor whose leading size is the batch size is cut,
    the others (masks shared by the batch, flags) are kept as they are."""
    B = batch_size_of(inputs)

    def cut(v):
        return v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v

    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, dict):
        return {k: cut(v) for k, v in inputs.items()}
    return type(inputs)(cut(v) for v in inputs)


@functools.lru_cache(maxsize=None)
def _accepts_use_cache(model_type):
    """Whether the class's forward takes ``use_cache`` (looked up once per class: call_model runs per batch)."""
    try:
        return "use_cache" in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


def call_model(model, inputs, params=None):
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a
    dict; with ``params`` (name -> tensor) through ``torch.func.functional_call`` (tied weights follow).
    A model whose forward takes ``use_cache`` (transformers) is called with ``use_cache=False``: a
    generation cache is no part of the loss and breaks forward-mode products."""
    if isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    if "use_cache" not in kwargs and _accepts_use_cache(type(model)):
        kwargs["use_cache"] = False
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, params, args, kwargs, strict=False)


def cast_floating(inputs, dtype):
    """Model inputs (or targets) with their floating-point tensors in ``dtype`` (indices and masks kept)."""
    def cast(v):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    if isinstance(inputs, dict):
        return {k: cast(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(cast(v) for v in inputs)
    return cast(inputs)


def model_output(output, output_fn=None):
    """The tensor the loss is taken of: ``output_fn(output)`` when given; else the output itself when it
    is a tensor, its ``.logits`` when it has them (transformers), or the first element of a tuple."""
    if output_fn is not None:
        out = output_fn(output)
    elif isinstance(output, torch.Tensor):
        out = output
    elif getattr(output, "logits", None) is not None:
        out = output.logits
    elif isinstance(output, (tuple, list)) and output:
        out = output[0]
    else:
        out = output
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"output_fn: the model returned {type(output).__name__}, from which no tensor was picked; pass "
                        "output_fn=lambda out: ... returning the tensor the loss is taken of")
    return out


def is_batch_pair(data):
    """Whether ``data`` is one (inputs, targets) pair rather than an iterable of such batches."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor) \
        and (isinstance(data[0], (torch.Tensor, dict)) or (isinstance(data[0], (tuple, list)) and bool(tensors_in(data[0]))))


def count_samples(data):
    """The number of samples in an (inputs, targets) pair or a list of such batches (0 when empty)."""
    if is_batch_pair(data):
        return batch_size_of(data[0], "data inputs")
    return sum(batch_size_of(b[0], f"data: batch {i}'s inputs") for i, b in enumerate(data))


def as_batches(data, batch_size=None):
    """A list of (inputs, targets) batches from an (inputs, targets) pair (cut into ``batch_size`` rows,
    None: one batch) or an iterable of such pairs; inputs are a tensor, tuple, list or dict (see
    ``call_model``); empty batches are dropped."""
    if is_batch_pair(data):
        x, y = data
        n = batch_size_of(x, "data inputs")
        if n != y.shape[0]:
            raise ValueError(f"data: inputs and targets differ in length: {n} and {y.shape[0]}")
        if n == 0:
            raise ValueError("data: no samples (an empty dataset)")
        step = batch_size or n
        batches = [(slice_batch(x, i, i + step), y[i : i + step]) for i in range(0, n, step)]
    else:
        try:
            batches = [tuple(b) for b in data]
        except TypeError:
            raise TypeError(f"data: expected an (inputs, targets) pair or an iterable of such batches, "
                            f"got {type(data).__name__}") from None
        for i, b in enumerate(batches):
            if len(b) != 2:
                raise ValueError(f"data: batch {i} has {len(b)} elements, expected (inputs, targets)")
            batch_size_of(b[0], f"data: batch {i}'s inputs")
    batches = [b for b in batches if batch_size_of(b[0]) > 0]
    if not batches:
        raise ValueError("data: no samples (an empty dataset or only empty batches)")
    return batches


def chosen_parameters(model, params):
    """(names, tensors) of ``params`` (None: every trainable parameter), in the order given. A weight
    tied to another (shared by two modules) appears once, under its first name."""
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


def flat_values(params):
    """The (P,) concatenation of the detached ``params``, flattened in order."""
    return torch.cat([p.detach().reshape(-1) for p in params])


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block; its previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

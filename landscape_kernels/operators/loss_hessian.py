"""The losses the curvature approximations know in closed form, and square roots of their Hessians in
the model outputs.

Two losses, each the mean over its batch:

- ``"cross_entropy"``: logits (..., C), class last (a (B, C) classifier or a (B, T, C) language model),
  integer targets (...); the mean over every row of logits, as ``F.cross_entropy`` on the rows;
- ``"mse"``: outputs and targets of one shape, the mean over every element, as ``F.mse_loss``.

The GGN of a batch is J^T H J with H the Hessian of the batch loss in the outputs; every function below
gives columns s_k (tensors shaped like the output) with sum_k s_k s_k^T = H exactly (``exact_columns``)
or in expectation (``monte_carlo_columns``: labels drawn from the model's predictive distribution,
Categorical for cross-entropy and a Gaussian of variance 1/2 for the squared error), so that the GGN
is sum_k (J^T s_k)(J^T s_k)^T: one backward pass per column. ``empirical_column`` is the gradient of the
batch loss scaled so that its per-sample pieces are the per-sample loss gradients over sqrt(B), for
the empirical Fisher (1/N) sum_n g_n g_n^T.
"""
import itertools
import math

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "mse")


def check_loss(loss):
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def mean_loss(loss):
    """The batch-mean loss function ``fn(output, targets)`` of ``loss``."""
    check_loss(loss)
    if loss == "mse":
        return F.mse_loss

    def cross_entropy(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return cross_entropy


def check_output(loss, output):
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() < 1:
        raise ValueError(f"the model output must be a floating-point tensor, got {getattr(output, 'shape', output)}")
    if loss == "cross_entropy" and output.dim() < 2:
        raise ValueError(f"cross_entropy needs logits of shape (B, ..., C), got {tuple(output.shape)}")


def exact_columns(loss, output, per_position=False):
    """Columns s_k with sum_k s_k s_k^T = the Hessian of the batch-mean loss in ``output``.

    cross-entropy: per row of probabilities p the Hessian diag(p) - p p^T = S S^T with
    S = diag(sqrt p) - p sqrt(p)^T, scaled by 1 / (number of rows); one column per class, every row at
    once. MSE: 2 / (number of elements) times the identity, one column per output feature.
    ``per_position``: for outputs with positions (B, T, ..., C), one column per (position, class), the
    others zero, so that products of different positions of one sample never meet (the exact GGN
    diagonal needs this; KFAC backpropagates every position at once, as its derivation does)."""
    check_output(loss, output)
    out = output.detach()
    C = out.shape[-1]
    if loss == "cross_entropy":
        rows = out.numel() // C
        p = out.softmax(-1)
        root = p.sqrt()
        # S[..., c, k] = delta_ck sqrt(p_c) - p_c sqrt(p_k); column k is S[..., :, k]
        def column(k):
            s = -p * root[..., k : k + 1]
            s[..., k] += root[..., k]
            return s / math.sqrt(rows)
    else:
        scale = math.sqrt(2.0 / out.numel())

        def column(k):
            s = torch.zeros_like(out)
            s[..., k] = scale
            return s
    if not per_position or out.dim() <= 2:
        for k in range(C):
            yield column(k)
        return
    for k in range(C):
        full = column(k)
        for where in itertools.product(*map(range, out.shape[1:-1])):
            at = (slice(None), *where)
            s = torch.zeros_like(full)
            s[at] = full[at]
            yield s


def monte_carlo_columns(loss, output, samples, generator):
    """``samples`` columns whose outer products average to the Hessian of the batch-mean loss: the
    gradient of the loss at labels drawn from the model's distribution, divided by sqrt(samples)
    (its per-row scale matched to the exact Hessian's)."""
    check_output(loss, output)
    out = output.detach()
    C = out.shape[-1]
    for _ in range(samples):
        if loss == "cross_entropy":
            rows = out.numel() // C
            p = out.softmax(-1).reshape(-1, C)
            drawn = torch.multinomial(p.double().cpu(), 1, generator=generator).reshape(-1)
            onehot = F.one_hot(drawn, C).to(p.device, p.dtype)
            s = (p - onehot).reshape(out.shape) / math.sqrt(rows)
        else:
            noise = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype)
            s = noise * math.sqrt(2.0 / out.numel())  # the gradient of the Gaussian loss at a drawn label
        yield s / math.sqrt(samples)


def empirical_column(loss, output, targets):
    """The gradient of the batch-mean loss in ``output`` times sqrt(B): its backward gives each sample
    its loss gradient g_n / sqrt(B), whose outer products summed over the batch and weighted B / N make
    the empirical Fisher (1/N) sum_n g_n g_n^T."""
    check_output(loss, output)
    out = output.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(mean_loss(loss)(out, targets), out)[0]
    return g * math.sqrt(out.shape[0])

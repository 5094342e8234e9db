"""``ModelOperator``: the shared set-up of the operators of a model's training loss.

The loss is the mean over a fixed dataset of ``loss_fn(output_fn(model(x)), y)``, which must itself be
the mean over its batch; batches are weighted by their size. Inputs are a tensor, a tuple (``model(*x)``)
or a dict (``model(**x)``); ``output_fn`` picks the tensor the loss is taken of (default: the output
itself, its ``.logits``, or its first element), see ``capture.model``. P counts the chosen parameters (``params``: None
for all trainable ones, or a list of names), flattened in model order. Products run with the model in
eval mode (restored afterwards).
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..capture.model import as_batches, batch_size_of, call_model, chosen_parameters, eval_mode, model_output
from .base import Operator


class ModelOperator(Operator):
    """Shared set-up of the operators of a model's loss: data, parameters, flattening, eval mode.

    Subclasses implement ``_matmat``; they see the data as ``batches`` (each weighted by
    ``batch_weight``), the chosen parameters as ``param_names`` / ``params``, and move between the flat
    (P, K) layout and one (K, *shape) tensor per parameter with ``unflatten`` / ``flatten``."""

    def __init__(self, model, loss_fn, data, params=None, batch_size=None, output_fn=None, math_attention=None):
        if math_attention not in (None, True, False):
            raise ValueError(f"math_attention must be None, True or False, got {math_attention!r}")
        self.model, self.loss_fn, self.output_fn = model, loss_fn, output_fn
        self.math_attention = math_attention
        self.batches = as_batches(data, batch_size)
        self.num_samples = sum(batch_size_of(b[0]) for b in self.batches)
        self.param_names, self.params = chosen_parameters(model, params)
        self.sizes = [p.numel() for p in self.params]
        P = sum(self.sizes)
        self.shape = (P, P)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device

    def unflatten(self, V):
        """(P, K) -> list of (K, *shape) per parameter."""
        return [c.T.reshape(-1, *p.shape) for c, p in zip(torch.split(V, self.sizes), self.params)]

    def as_parameter_dict(self, flat):
        """A (P,) vector (a diagonal, a gradient) as a dict name -> tensor shaped like the parameter."""
        if flat.dim() != 1 or flat.shape[0] != self.shape[0]:
            raise ValueError(f"as_parameter_dict: expected a ({self.shape[0]},) vector, got {tuple(flat.shape)}")
        return {n: part[0] for n, part in zip(self.param_names, self.unflatten(flat[:, None]))}

    @staticmethod
    def flatten(parts):
        """list of (K, *shape) -> (P, K)."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1).T

    def eval_mode(self):
        """The model in eval mode for the products (its mode restored afterwards)."""
        return eval_mode(self.model)

    def attention_safe(self, product):
        """``product()`` with ``scaled_dot_product_attention`` on its math backend when ``math_attention``
        is True, or, when it is None, after the first product that needs it: the fused backends have no
        second or forward-mode derivatives (the math backend is exact, and slower). False: the error
        names the switch."""
        if self.math_attention:
            with sdpa_kernel(SDPBackend.MATH):
                return product()
        try:
            return product()
        except (RuntimeError, NotImplementedError) as exc:
            text = str(exc)
            if not any(k in text for k in ("scaled_dot_product", "_flash_attention", "efficient_attention")):
                raise
            if self.math_attention is not None:
                raise RuntimeError(
                    f"{type(self).__name__}: the products need second or forward-mode derivatives of "
                    "scaled_dot_product_attention, which its fused backends lack; pass math_attention=True (exact, "
                    "the math backend) or None (switch when needed). Original error: " + text) from exc
        # retried here, past the except block: the exception's traceback holds the failed attempt's
        # frames, and with them its whole gradient graph, until the block ends (on a 13.8M GPT-2 the
        # first product's peak was 4.7 GB with the retry inside the block, 3.2 GB past it)
        self.math_attention = True
        return self.attention_safe(product)

    def output(self, param_values, x, model=None):
        """The tensor the loss is taken of on inputs ``x``, the chosen parameters set to ``param_values``
        (None: as they are); ``model``: another copy of the model (default: the operator's)."""
        values = None if param_values is None else dict(zip(self.param_names, param_values))
        return model_output(call_model(self.model if model is None else model, x, values), self.output_fn)

    def batch_loss(self, param_values, x, y):
        """``loss_fn`` on the batch (x, y) with the chosen parameters set to ``param_values``."""
        return self.loss_fn(self.output(param_values, x), y)

    def batch_weight(self, x):
        """The batch's share of the data (batches are weighted by their size)."""
        return batch_size_of(x) / self.num_samples

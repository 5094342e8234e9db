"""``ModelOperator``: the shared set-up of the operators of a model's training loss.

The loss is the mean over a fixed dataset of ``loss_fn(model(x), y)``, which must itself be the mean
over its batch; batches are weighted by their size. P counts the chosen parameters (``params``: None
for all trainable ones, or a list of names), flattened in model order. Products run with the model in
eval mode (restored afterwards).
"""
import torch
from torch.func import functional_call

from ..capture.model import as_batches, chosen_parameters, eval_mode
from .base import Operator


class ModelOperator(Operator):
    """Shared set-up of the operators of a model's loss: data, parameters, flattening, eval mode.

    Subclasses implement ``_matmat``; they see the data as ``batches`` (each weighted by
    ``batch_weight``), the chosen parameters as ``param_names`` / ``params``, and move between the flat
    (P, K) layout and one (K, *shape) tensor per parameter with ``unflatten`` / ``flatten``."""

    def __init__(self, model, loss_fn, data, params=None, batch_size=None):
        self.model, self.loss_fn = model, loss_fn
        self.batches = as_batches(data, batch_size)
        self.num_samples = sum(b[0].shape[0] for b in self.batches)
        self.param_names, self.params = chosen_parameters(model, params)
        self.sizes = [p.numel() for p in self.params]
        P = sum(self.sizes)
        self.shape = (P, P)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device

    def unflatten(self, V):
        """(P, K) -> list of (K, *shape) per parameter."""
        return [c.T.reshape(-1, *p.shape) for c, p in zip(torch.split(V, self.sizes), self.params)]

    @staticmethod
    def flatten(parts):
        """list of (K, *shape) -> (P, K)."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1).T

    def eval_mode(self):
        """The model in eval mode for the products (its mode restored afterwards)."""
        return eval_mode(self.model)

    def batch_loss(self, param_values, x, y):
        """``loss_fn`` on the batch (x, y) with the chosen parameters set to ``param_values``."""
        values = dict(zip(self.param_names, param_values))
        return self.loss_fn(functional_call(self.model, values, (x,), strict=False), y)

    def batch_weight(self, x):
        """The batch's share of the data (batches are weighted by their size)."""
        return x.shape[0] / self.num_samples

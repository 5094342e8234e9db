"""``GGNOperator``: the generalised Gauss-Newton matrix of a model's mean training loss."""
import torch
from torch.func import jvp, vmap

from .model import ModelOperator


class GGNOperator(ModelOperator):
    """Generalised Gauss-Newton J^T H_out J averaged over the data, H_out the Hessian of the loss in the
    model outputs (exact for any loss: taken by double backward in output space, e.g. diag(s) - s s^T
    per sample for cross-entropy). It linearises the model at the tensor the loss is taken of
(``output_fn``)."""

    def __init__(self, model, loss_fn, data, params=None, batch_size=None, output_fn=None, math_attention=None):
        super().__init__(model, loss_fn, data, params, batch_size, output_fn, math_attention)

    def _matmat(self, V):
        with self.eval_mode():
            return self.attention_safe(lambda: self._products(V))

    def _products(self, V):
        vs = self.unflatten(V)
        primals = tuple(p.detach() for p in self.params)
        out = [torch.zeros_like(v) for v in vs]
        for x, y in self.batches:
            w = self.batch_weight(x)

            def f(*values, x=x):
                return self.output(values, x)

            Jv = vmap(lambda *t: jvp(f, primals, t)[1])(*vs)  # (K, *output)
            o = f(*primals).detach().requires_grad_(True)
            g = torch.autograd.grad(self.loss_fn(o, y) * w, o, create_graph=True)[0]
            HJv = torch.autograd.grad(g, o, grad_outputs=Jv, is_grads_batched=True)[0]
            values = [p.detach().requires_grad_(True) for p in self.params]
            outputs = f(*values)
            JtHJv = torch.autograd.grad(outputs, values, grad_outputs=HJv, is_grads_batched=True)
            for acc, h in zip(out, JtHJv):
                acc.add_(h)
        return self.flatten(out)

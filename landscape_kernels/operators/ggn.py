"""``GGNOperator``: the generalised Gauss-Newton matrix of a model's mean training loss."""
import torch
from torch.func import functional_call, jvp, vmap

from .model import ModelOperator


class GGNOperator(ModelOperator):
    """Generalised Gauss-Newton J^T H_out J averaged over the data, H_out the Hessian of the loss in the
    model outputs (exact for any loss: taken by double backward in output space, e.g. diag(s) - s s^T
    per sample for cross-entropy)."""

    def _matmat(self, V):
        vs = self.unflatten(V)
        primals = tuple(p.detach() for p in self.params)
        out = [torch.zeros_like(v) for v in vs]
        with self.eval_mode():
            for x, y in self.batches:
                w = self.batch_weight(x)

                def f(*values, x=x):
                    return functional_call(self.model, dict(zip(self.param_names, values)), (x,), strict=False)

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

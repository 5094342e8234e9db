"""What every algorithm here does with an operator: apply it to random probes, counting the products."""
import torch


class CountedProducts:
    """Counts operator products (columns) and checks what comes back."""

    def __init__(self, op, name):
        self.op, self.name, self.products = op, name, 0

    def __call__(self, V, step):
        out = self.op.matmat(V)
        self.products += V.shape[1]
        if out.shape != V.shape:
            raise ValueError(f"{self.name}: op.matmat returned shape {tuple(out.shape)} for input {tuple(V.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"{self.name}: the operator returned NaN/Inf at Lanczos step {step}")
        return out


def rademacher(P, n, gen, dtype=torch.float64):
    """(P, n) random signs from the CPU generator ``gen``."""
    return (torch.randint(0, 2, (P, n), generator=gen) * 2 - 1).to(dtype)

"""Tracking the sharpest directions of the training loss along training (Jastrzębski et al. 2019).

``SharpnessTracker`` is an ``SGDTrainer`` callback. At the start of every epoch (or every ``every``
steps) it computes the top-K eigenpairs of the Hessian of the training loss on a fixed subset of the
training data (the paper: 2560 samples in batches of 128, inference mode), warm-started from the previous
eigenvectors (Lanczos started from them, see ``warm_block_size``), which converges in fewer products
than a cold start from a random vector while the top subspace moves slowly. It logs:

- lambda_1..lambda_K with their residual norms, the products spent, and eta * lambda_1 (a step of size
  eta decreases the loss along e_1 only while eta lambda_1 < 2);
- ||H||_F as sqrt(mean_m ||H v_m||^2) over Gaussian v_m (unbiased for tr H^2), and the released code's
  sqrt(mean_m ||H v_m||) beside it (``frobenius_released``), both from the same products;
- the distance ||theta - theta_0|| from the weights the tracker first saw;
- alignment (Jastrzębski et al. 2019) at the measured weights: for ``alignment_batches`` random minibatches of the
  trainer's batch size, the cosine of each minibatch gradient g_B with the subset's full gradient g and
  with each e_i, and the share ||E^T g_B||^2 / ||g_B||^2 of the SGD step (-eta g_B) inside the top-K
  subspace; means and standard deviations over the minibatches, and cos(g, e_i).

The eigenvectors (``vectors``, (P, K) over the chosen parameters flattened in model order) and
``version`` (incremented per measurement) are what ``optim.NSGD`` refreshes its subspace from.
"""
import math
import time

import torch

from ..capture.model import as_batches, chosen_parameters, eval_mode, flat_values
from ..linalg.lanczos import lanczos_eigs
from ..operators.hessian import HessianOperator


def fixed_subset(x, y, n=2560, seed=0):
    """``n`` samples of (x, y) drawn once without replacement by a seeded generator (Jastrzębski et al. 2019)."""
    if not 1 <= int(n) <= x.shape[0]:
        raise ValueError(f"fixed_subset: n must be in [1, {x.shape[0]}] (the dataset size), got {n!r}")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: int(n)].to(x.device)
    return x[idx], y[idx]


def training_subset(x, y, size, seed=0):
    """The training set cut to a seeded random subset of ``size`` samples (None or at least the whole set:
    all of it); the jobs' ``--train-samples``."""
    if size is None or size >= x.shape[0]:
        return x, y
    return fixed_subset(x, y, size, seed=seed + 1)


def flat_gradient(model, loss_fn, batches, params, create_graph=False):
    """Gradient of the sample-weighted mean loss over ``batches`` w.r.t. ``params``, flattened (P,)."""
    total = sum(b[0].shape[0] for b in batches)
    out = None
    for x, y in batches:
        g = torch.autograd.grad(loss_fn(model(x), y) * (x.shape[0] / total), params, create_graph=create_graph)
        flat = torch.cat([t.reshape(-1) for t in g])
        out = flat if out is None else out + flat
    return out


def minibatch_gradients(model, loss_fn, x, y, batch_size, count, params=None, seed=0):
    """(P, count) gradients of the mean loss over ``count`` minibatches of ``batch_size`` samples of
    (x, y), each drawn without replacement by a generator seeded with ``seed``; model in eval mode."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"minibatch_gradients: count must be a positive int, got {count!r}")
    if not 1 <= int(batch_size) <= x.shape[0]:
        raise ValueError(f"minibatch_gradients: batch_size must be in [1, {x.shape[0]}], got {batch_size!r}")
    _, chosen = chosen_parameters(model, params)
    gen = torch.Generator().manual_seed(int(seed))
    with eval_mode(model):
        cols = []
        for _ in range(count):
            idx = torch.randperm(x.shape[0], generator=gen)[: int(batch_size)].to(x.device)
            cols.append(flat_gradient(model, loss_fn, [(x[idx], y[idx])], chosen))
    return torch.stack(cols, 1)


class DenseEarly:
    """A tracker schedule: every ``every`` steps during the first ``early_epochs`` epochs, where lambda_1
    rises fastest, then at the start of every epoch (the paper: per epoch, and every 128-2048 examples in
    early-phase runs)."""

    def __init__(self, every, early_epochs=1):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"DenseEarly: every must be a positive int, got {every!r}")
        if not isinstance(early_epochs, int) or early_epochs < 0:
            raise ValueError(f"DenseEarly: early_epochs must be an int >= 0, got {early_epochs!r}")
        self.every, self.early_epochs = every, early_epochs

    def __call__(self, trainer, step):
        if trainer.epoch < self.early_epochs:
            return step % self.every == 0
        return trainer.batch_index == 0


class SharpnessTracker:
    """Args:
        model, loss_fn: the trained network and its mean loss.
        data: the fixed subset (x, y) (see ``fixed_subset``) or an iterable of batches.
        k: number of top eigenpairs (the paper: 5 or 10).
        every: None measures before the first step of every epoch; an int every that many steps; or a
            schedule ``every(trainer, step) -> bool`` (e.g. ``DenseEarly``).
        params: parameter names (None: every trainable parameter).
        batch_size: Hessian products run over the subset in batches of this size (the paper: 128).
        tol: Lanczos convergence, residual <= tol * |lambda_max|.
        warm_start: start each solve from the previous eigenvectors.
        warm_block_size: Lanczos block size of a warm solve: 1 (default) starts from the sum of the
            previous eigenvectors, which is rich in the top subspace and robust when it has moved; k
            starts from their span exactly, which wins when it has barely moved (then one block step
            may suffice) and loses when it has (block Krylov spaces grow slower per product).
        frobenius_probes: Gaussian probes of ||H||_F per measurement (0: skip).
        alignment_batches: minibatches drawn for the alignment statistics (0: skip).
        seed: seeds the Lanczos start, the probes and the minibatch draws.
    """

    def __init__(self, model, loss_fn, data, k=5, every=None, params=None, batch_size=128, tol=1e-3,
                 warm_start=True, warm_block_size=1, frobenius_probes=50, alignment_batches=10, seed=0):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"SharpnessTracker: k must be a positive int, got {k!r}")
        if every is not None and not callable(every) and (not isinstance(every, int) or every < 1):
            raise ValueError("SharpnessTracker: every must be None (each epoch), a positive int or a schedule "
                             f"(trainer, step) -> bool, got {every!r}")
        for name, v in (("frobenius_probes", frobenius_probes), ("alignment_batches", alignment_batches)):
            if not isinstance(v, int) or v < 0 or v == 1:
                raise ValueError(f"SharpnessTracker: {name} must be 0 or an int >= 2, got {v!r}")
        self.model, self.loss_fn, self.k, self.every = model, loss_fn, k, every
        self.batches = as_batches(data, batch_size)
        self.param_names, params_ = chosen_parameters(model, params)
        self.num_params = sum(p.numel() for p in params_)
        if k > self.num_params:
            raise ValueError(f"SharpnessTracker: k = {k} exceeds the {self.num_params} chosen parameters")
        if not isinstance(warm_block_size, int) or not 1 <= warm_block_size <= k:
            raise ValueError(f"SharpnessTracker: warm_block_size must be an int in [1, k = {k}], got {warm_block_size!r}")
        self.batch_size, self.tol, self.warm_start, self.seed = batch_size, float(tol), bool(warm_start), int(seed)
        self.warm_block_size = warm_block_size
        self.frobenius_probes, self.alignment_batches = frobenius_probes, alignment_batches
        self.theta0 = self._theta().clone()
        self.vectors = None  # (P, k) eigenvectors of the last measurement
        self.version = 0
        self.history = []
        self.last_minibatch_gradients = None

    # ------------------------------------------------------------------ callback
    def before_step(self, trainer, step):
        if self.every is None:
            due = trainer.batch_index == 0
        elif callable(self.every):
            due = self.every(trainer, step)
        else:
            due = step % self.every == 0
        if due:
            self.measure(trainer)

    def state_dict(self):
        return {"theta0": self.theta0, "vectors": self.vectors, "version": self.version, "history": self.history}

    def load_state_dict(self, state):
        self.theta0, self.vectors = state["theta0"], state["vectors"]
        self.version, self.history = state["version"], state["history"]

    # ------------------------------------------------------------------ measurement
    def _params(self):
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.param_names]

    def _theta(self):
        return flat_values(self._params())

    def measure(self, trainer=None):
        """One measurement at the current weights; appended to ``history`` and returned. ``trainer``
        (optional) supplies the step, epoch, learning rate, batch size and the data minibatches are
        drawn from (default: the subset, batch size 128)."""
        t0 = time.perf_counter()
        H = HessianOperator(self.model, self.loss_fn, self.batches, params=self.param_names, keep_graph=True)
        warm = self.warm_start and self.vectors is not None
        res = lanczos_eigs(H, self.k, which="LA", tol=self.tol, seed=self.seed + self.version,
                           v0=self.vectors if warm else None, block_size=self.warm_block_size if warm else 1,
                           residuals="estimate")
        if not res.converged:
            raise RuntimeError(f"SharpnessTracker: Lanczos did not reach tol {self.tol} in {res.num_steps} steps")
        lr = trainer.optimizer.param_groups[0]["lr"] if trainer is not None else None
        record = {"step": trainer.step if trainer is not None else None,
                  "epoch": trainer.epoch if trainer is not None else None,
                  "eigenvalues": res.eigenvalues.tolist(), "residuals": res.residuals.tolist(),
                  "products": res.num_products, "warm_start": warm,
                  "lr_lambda1": None if lr is None else lr * float(res.eigenvalues[0]),
                  "distance_from_init": float((self._theta() - self.theta0.to(H.device)).norm())}
        record["eigen_seconds"] = time.perf_counter() - t0
        self.vectors = res.eigenvectors.detach()
        self.version += 1
        if self.frobenius_probes:
            record.update(self._frobenius(H))
        if self.alignment_batches:
            record.update(self._alignment(trainer))
        record["seconds"] = time.perf_counter() - t0
        self.history.append(record)
        return record

    def _frobenius(self, H):
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.version)
        V = torch.randn(H.shape[0], self.frobenius_probes, generator=gen, dtype=torch.float64).to(H.device, H.dtype)
        norms = H.matmat(V).double().norm(dim=0)
        sq = norms.pow(2)
        return {"frobenius": math.sqrt(float(sq.mean())),
                "frobenius_stderr": float(sq.std()) / math.sqrt(len(sq)) / (2 * math.sqrt(max(float(sq.mean()), 1e-300))),
                "frobenius_released": math.sqrt(float(norms.mean()))}

    def _alignment(self, trainer):
        params = self._params()
        with eval_mode(self.model):
            g = flat_gradient(self.model, self.loss_fn, self.batches, params)
        if trainer is not None:
            x, y, B = trainer.x, trainer.y, trainer.batch_size
        else:
            x = torch.cat([b[0] for b in self.batches])
            y = torch.cat([b[1] for b in self.batches])
            B = min(self.batch_size or x.shape[0], x.shape[0])
        G = minibatch_gradients(self.model, self.loss_fn, x, y, B, self.alignment_batches, params=self.param_names,
                                seed=self.seed * 104729 + self.version)
        self.last_minibatch_gradients = G  # (P, n), for step analyses at the same weights (not checkpointed)
        E = self.vectors.to(g.dtype)
        unit = G / G.norm(dim=0).clamp_min(1e-300)
        cos_full = (g / g.norm().clamp_min(1e-300)) @ unit  # (n,)
        cos_e = E.T @ unit  # (k, n)
        share = (cos_e ** 2).sum(0)  # ||E^T g_B||^2 / ||g_B||^2

        def stats(t):
            return t.double().mean(-1).tolist(), t.double().std(-1).tolist()

        (cf_mean, cf_std), (ce_mean, ce_std), (sh_mean, sh_std) = stats(cos_full), stats(cos_e), stats(share)
        return {"cos_minibatch_full": cf_mean, "cos_minibatch_full_std": cf_std,
                "cos_minibatch_e": ce_mean, "cos_minibatch_e_std": ce_std,
                "step_share_topk": sh_mean, "step_share_topk_std": sh_std,
                "cos_full_e": (E.T @ (g / g.norm().clamp_min(1e-300))).tolist(),
                "gradient_norm": float(g.norm())}

"""SGD (or NSGD) runs with the sharpest directions tracked along training: the shared part of
``reproduce sharpest-directions`` and ``reproduce nsgd`` (Jastrzębski et al., ICLR 2019).

One run lives in its own folder: ``checkpoint.pt`` while it trains (``--resume`` continues it) and
``result.json`` once it is done (a resumed job then reuses it as is).
"""
import os
from dataclasses import dataclass

import torch.nn.functional as F

from ..analyses.sharpest import cross_sections, decomposed_step
from ..training.data import load_dataset
from ..training.models import mlp, simple_cnn
from ..training.optim import NSGD
from ..training.sharpness import DenseEarly, SharpnessTracker, fixed_subset, minibatch_gradients, training_subset
from ..training.trainer import SGDTrainer
from .job import data_dir_option, dataset_option, option

MODELS = ("mlp", "simple_cnn")


@dataclass
class TrackedConfig:
    """The settings ``sharpest-directions`` and ``nsgd`` share."""

    dataset: str = dataset_option("mnist")
    data_dir: str = data_dir_option()
    model: str = option("mlp", "mlp: 784-50-50-10 ReLU (minutes on a CPU); simple_cnn: the paper's SimpleCNN (a GPU)",
                        choices=MODELS)
    epochs: int = option(30, "epochs per setting")
    train_samples: int = option(None, "train on a seeded random subset of this size (default: all)", type=int)
    subset: int = option(2560, "the fixed subset the Hessian is measured on (the paper: 2560)")
    k: int = option(5, "top-K Hessian eigenpairs (the paper: 5 or 10)")
    frobenius_probes: int = option(50, "Gaussian probes of ||H||_F per measurement (the paper: 50; 0 skips it)",
                                   minimum=0)
    tol: float = 1e-3
    seed: int = option(0, "seed of the initialisation, the minibatch order and the subset", minimum=0)
    quick: bool = option(False, "a short run on the embedded digits")


def build_model(name, num_features, seed):
    if name == "mlp":
        return mlp((num_features, 50, 50, 10), seed=seed)
    if name == "simple_cnn":
        if num_features != 784:
            raise ValueError(f"model 'simple_cnn' needs 28 x 28 images (784 features), the data has {num_features}; "
                             "use --model mlp for the 8 x 8 digits")
        return simple_cnn(seed=seed)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def load_data(dataset, data_dir, train_samples, subset, seed):
    """(train x, y), (test x, y) and the fixed Hessian subset; ``train_samples`` (None: all) cuts the
    training set to a seeded random subset."""
    x, y = load_dataset(dataset, "train", data_dir)
    xt, yt = load_dataset(dataset, "test", data_dir)
    x, y = training_subset(x, y, train_samples, seed)
    return (x, y), (xt, yt), fixed_subset(x, y, min(subset, x.shape[0]), seed=seed)


class StepAnalyses:
    """Callback placed after a ``SharpnessTracker``: at each of the tracker's first ``count``
    measurements, the decomposed step and the cross-sections (Jastrzębski et al. 2019) at the same weights, stored
    in that measurement's record (so they are checkpointed with the tracker)."""

    def __init__(self, tracker, data, count, batch_size=128, seed=0):
        self.tracker, self.data, self.count, self.batch_size, self.seed = tracker, data, count, batch_size, seed
        self._seen = tracker.version

    def before_step(self, trainer, step):
        t = self.tracker
        if t.version == self._seen:
            return
        self._seen = t.version
        if len(t.history) > self.count:
            return
        lr = trainer.optimizer.param_groups[0]["lr"]
        G = t.last_minibatch_gradients
        if G is None:
            G = minibatch_gradients(t.model, t.loss_fn, trainer.x, trainer.y, trainer.batch_size, 10,
                                    params=t.param_names, seed=self.seed + t.version)
        res = decomposed_step(t.model, t.loss_fn, self.data, t.vectors, G, lr, params=t.param_names,
                              batch_size=self.batch_size, seed=self.seed + t.version)
        step_lengths = lr * res.projections[: t.k].abs().mean(1)
        cs = cross_sections(t.model, t.loss_fn, self.data, t.vectors, step_lengths, params=t.param_names,
                            batch_size=self.batch_size)
        t.history[-1]["decomposed"] = res.to_dict()
        t.history[-1]["cross_sections"] = cs.to_dict()

    def state_dict(self):
        return {"seen": self._seen}

    def load_state_dict(self, state):
        self._seen = state["seen"]


def train_tracked(ctx, folder, train, test, subset, *, model_name, batch_size, lr, epochs, k, every, seed, tol=1e-3,
                  dense_epochs=0, gamma=None, step_analyses=0, alignment_batches=10, frobenius_probes=50):
    """One tracked run into ``folder``; returns its result dict (also written to ``result.json``, which
    ``--resume`` reuses). The top-K eigenpairs are measured every ``every`` steps during the first
    ``dense_epochs`` epochs and at the start of every epoch after (``every`` None: every epoch from the
    start), and at the end. ``gamma`` None: plain SGD; a number: NSGD with that gamma, its subspace
    refreshed by the tracker."""
    def compute():
        x, y = train
        model = build_model(model_name, x.shape[1], seed)
        schedule = None if every is None else DenseEarly(every, dense_epochs)
        tracker = SharpnessTracker(model, F.cross_entropy, subset, k=k, every=schedule, tol=tol,
                                   frobenius_probes=frobenius_probes, alignment_batches=alignment_batches, seed=seed)
        callbacks = [tracker]
        if step_analyses:
            callbacks.append(StepAnalyses(tracker, subset, step_analyses, seed=seed))
        optimizer = None if gamma is None else NSGD(model.parameters(), lr, gamma=gamma, refresh=tracker)
        trainer = SGDTrainer(model, x, y, batch_size=batch_size, lr=lr, seed=seed, callbacks=callbacks,
                             checkpoint=os.path.join(folder, "checkpoint.pt"), optimizer=optimizer,
                             checkpoint_seconds=ctx.checkpoint_seconds)
        ctx.resume_training(trainer).run(max_epochs=epochs, stopping_rule=None, progress=ctx.progress)
        final = tracker.measure(trainer)  # at the final weights
        test_loss, test_accuracy = trainer.evaluate(*test)
        lambdas = [r["eigenvalues"][0] for r in tracker.history]
        peak = max(range(len(lambdas)), key=lambdas.__getitem__)
        steps_per_epoch = trainer.steps_per_epoch
        result = {
            "batch_size": batch_size, "lr": lr, "gamma": gamma, "model": model_name, "epochs": epochs,
            "train_samples": int(x.shape[0]), "steps_per_epoch": steps_per_epoch, "measure_every_steps": every,
            "dense_epochs": dense_epochs,
            "measurements": [_compact(r, steps_per_epoch) for r in tracker.history],
            "training": trainer.history,
            "peak_lambda1": lambdas[peak], "peak_epoch": tracker.history[peak]["step"] / steps_per_epoch,
            "peak_lr_lambda1": lr * lambdas[peak], "peak_at_end": peak == len(lambdas) - 1,
            "final_lambda1": final["eigenvalues"][0], "final_frobenius": final.get("frobenius"),
            "final_frobenius_stderr": final.get("frobenius_stderr"),
            "test_loss": test_loss, "test_accuracy": test_accuracy,
            "tracking_seconds": sum(r["seconds"] for r in tracker.history),
            "training_seconds": sum(r["seconds"] for r in trainer.history),
        }
        return result

    result = ctx.reuse(os.path.join(folder, "result.json"), compute, label=folder)
    checkpoint = os.path.join(folder, "checkpoint.pt")
    if os.path.isfile(checkpoint):  # the result holds everything the reports need
        os.remove(checkpoint)
    return result


def _compact(record, steps_per_epoch):
    """A measurement record with its position in epochs (the x axis of every curve)."""
    out = dict(record)
    out["epoch_float"] = record["step"] / steps_per_epoch
    return out

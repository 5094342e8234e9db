"""SGD (or NSGD) runs with the sharpest directions tracked along training: the shared part of
``reproduce sharpest-directions`` and ``reproduce nsgd`` (SPEC §2).

One run lives in its own folder: ``checkpoint.pt`` while it trains (``--resume`` continues it) and
``result.json`` once it is done (a resumed job then reuses it as is).
"""
import json
import os

import torch.nn.functional as F

from ..analyses.sharpest import cross_sections, decomposed_step
from ..training.data import load_dataset
from ..training.models import mlp, simple_cnn
from ..training.optim import NSGD
from ..training.sharpness import DenseEarly, SharpnessTracker, fixed_subset, minibatch_gradients
from ..training.trainer import SGDTrainer

MODELS = ("mlp", "simple_cnn")


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
    if train_samples is not None and train_samples < x.shape[0]:
        x, y = fixed_subset(x, y, train_samples, seed=seed + 1)
    return (x, y), (xt, yt), fixed_subset(x, y, min(subset, x.shape[0]), seed=seed)


class StepAnalyses:
    """Callback placed after a ``SharpnessTracker``: at each of the tracker's first ``count``
    measurements, the decomposed step and the cross-sections (SPEC §2.2) at the same weights, stored
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


def train_tracked(folder, train, test, subset, *, model_name, batch_size, lr, epochs, k, every, seed, tol=1e-3,
                  dense_epochs=0, gamma=None, step_analyses=0, alignment_batches=10, resume=False, progress=False, log=print):
    """One tracked run into ``folder``; returns its result dict (also written to ``result.json``).
    The top-K eigenpairs are measured every ``every`` steps during the first ``dense_epochs`` epochs
    and at the start of every epoch after (``every`` None: every epoch from the start), and at the end.
    ``gamma`` None: plain SGD; a number: NSGD with that gamma, its subspace refreshed by the tracker."""
    os.makedirs(folder, exist_ok=True)
    done = os.path.join(folder, "result.json")
    if resume and os.path.isfile(done):
        with open(done) as f:
            log(f"{folder}: done before, reusing {done}")
            return json.load(f)
    x, y = train
    model = build_model(model_name, x.shape[1], seed)
    schedule = None if every is None else DenseEarly(every, dense_epochs)
    tracker = SharpnessTracker(model, F.cross_entropy, subset, k=k, every=schedule, tol=tol,
                               alignment_batches=alignment_batches, seed=seed)
    callbacks = [tracker]
    if step_analyses:
        callbacks.append(StepAnalyses(tracker, subset, step_analyses, seed=seed))
    optimizer = None if gamma is None else NSGD(model.parameters(), lr, gamma=gamma, refresh=tracker)
    trainer = SGDTrainer(model, x, y, batch_size=batch_size, lr=lr, seed=seed, callbacks=callbacks,
                         checkpoint=os.path.join(folder, "checkpoint.pt"), optimizer=optimizer)
    if resume and os.path.isfile(trainer.checkpoint):
        trainer.resume()
        log(f"{folder}: resumed at epoch {trainer.epoch}, step {trainer.step}")
    trainer.run(max_epochs=epochs, stopping_rule=None, progress=progress)
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
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    os.remove(trainer.checkpoint)  # the result holds everything the reports need
    return result


def _compact(record, steps_per_epoch):
    """A measurement record with its position in epochs (the x axis of every curve)."""
    out = dict(record)
    out["epoch_float"] = record["step"] / steps_per_epoch
    return out

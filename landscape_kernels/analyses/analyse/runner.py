"""``analyse``: the noise and curvature report of any model, as a library call.

One ``Problem`` (the model, loss, fixed samples and the operators built on them) runs the chosen
stages in order; each returns a result for ``to_dict()`` and arrays (eigenvectors, profiles, the
surface) for the stages after it and for the figures. With ``cache_dir`` every finished stage is kept
on disk, and ``resume=True`` reads back what an earlier call finished instead of computing it again.

Under ``torchrun`` each rank passes its shard of the samples and gets the analysis of the union; rank
0 alone writes the cache and logs, and a stage is read back only when every rank finds it.
"""
import time
from dataclasses import dataclass, field

from .approximations import kfac_stage
from .cache import StageCache
from .curvature import density_stage, ggn_stage, hessian_stage, layers_stage, trace_stage
from .landscape import profiles_stage, surface_stage
from .noise import noise_stage
from .overlap import overlap_stage
from .problem import Problem
from .ranks import Ranks
from .settings import AnalyseSettings, resolve_stages

STAGE_FUNCTIONS = {"hessian": hessian_stage, "ggn": ggn_stage, "density": density_stage, "trace": trace_stage,
                   "layers": layers_stage, "noise": noise_stage, "overlap": overlap_stage, "profiles": profiles_stage,
                   "surface": surface_stage, "kfac": kfac_stage}


@dataclass
class ModelAnalysis:
    """What ``analyse`` measured: ``stages`` (stage -> result dict), ``timings_s`` (stage -> seconds;
    0 for a stage read back by ``resume``), the loss over the samples, their count and the number of
    parameters; ``arrays`` (stage arrays: eigenvectors, densities, profiles, the surface) stay out of
    ``to_dict()``. ``scalars()`` flattens the headline numbers (for curves along training). ``ranks``:
    the processes whose shards the samples are."""

    stages: dict
    timings_s: dict
    loss: float
    num_samples: int
    num_params: int
    settings: dict
    ranks: int = 1
    arrays: dict = field(default_factory=dict, repr=False)

    def to_dict(self):
        return {"loss": self.loss, "num_samples": self.num_samples, "num_params": self.num_params, "ranks": self.ranks,
                "settings": self.settings, "timings_s": self.timings_s, "stages": self.stages}

    def scalars(self):
        """{name: value} of the headline numbers of the stages that ran."""
        st, out = self.stages, {"loss": self.loss}
        if "hessian" in st:
            out["lambda_1"] = st["hessian"]["eigenvalues"][0]
        if "ggn" in st:
            out["ggn_lambda_1"] = st["ggn"]["eigenvalues"][0]
        if "density" in st:
            out["negative_curvature_share"] = st["density"]["negative_curvature_share"][0]
        if "trace" in st:
            out["trace"], out["frobenius"] = st["trace"]["trace"], st["trace"]["frobenius"]
        if "noise" in st:
            out["b_simple"], out["noise_trace"] = st["noise"]["b_simple"], st["noise"]["noise_trace"]
            out["gradient_sq_norm"] = st["noise"]["gradient_sq_norm"]
        if "overlap" in st:
            out["subspace_overlap"] = st["overlap"]["subspace_overlap"]
            if st["overlap"]["gamma"]:
                out["gamma"] = st["overlap"]["gamma"]["exponent"]
        return out


def analyse(model, loss_fn, data, what="all", params=None, output_fn=None, batch_size=None, settings=None,
            quick=False, cache_dir=None, resume=False, progress=False, log=None, distributed=None, group=None):
    """The noise and curvature report of ``model`` on ``data`` (``docs/analyse.md``).

    Args:
        model, loss_fn: the model and ``loss_fn(outputs, targets)``, the mean loss over a batch.
        data: an (inputs, targets) pair (cut into ``batch_size`` rows) or an iterable of such batches;
            inputs a tensor, tuple or dict (``model(**inputs)``). These samples are used by every stage.
        what: a stage or a list of them (``STAGES``: hessian, ggn, density, trace, layers, noise,
            overlap, profiles, surface, kfac), or a group ("all": every stage but kfac, "curvature",
            "landscape"); the stages a chosen one needs run too.
        params: parameter names to analyse (None: every trainable one); output_fn: the tensor the loss
            is taken of (default: the output, its ``.logits`` or its first element).
        settings: ``AnalyseSettings`` (default: its defaults; ``quick`` takes its quick variant).
        cache_dir, resume: keep each finished stage in this folder; with ``resume`` reuse them.
        progress: a progress bar per long stage; log: called with one line per finished stage.
        distributed, group: in a ``torch.distributed`` group (None: when one of more than one rank is
            initialised), ``data`` is this rank's shard and every rank gets the analysis of the union of
            the shards (call it on every rank with the same arguments otherwise); ``group`` None: the world.
    Returns: ``ModelAnalysis``.
    """
    settings = (settings or AnalyseSettings())
    if not isinstance(settings, AnalyseSettings):
        raise TypeError(f"analyse: settings must be an AnalyseSettings, got {type(settings).__name__}")
    settings = (settings.quick() if quick else settings).checked()
    stages = resolve_stages(what, settings)
    ranks = Ranks(distributed, group)
    log = log if log and ranks.writer else (lambda line: None)
    problem = Problem(model, loss_fn, data, params, output_fn, batch_size, settings, progress, ranks)
    cache = StageCache(cache_dir, resume, write=ranks.writer)
    results, arrays, timings = {}, {}, {}
    for stage in stages:
        kept = cache.get(stage) if resume else None
        if ranks.distributed and not ranks.all_true(kept is not None):
            kept = None  # a rank that lacks it computes it, so every rank must
        if kept is not None:
            result, stage_arrays = kept
            timings[stage] = 0.0
            log(f"{stage}: done before, reusing it")
        else:
            t0 = time.perf_counter()
            result, stage_arrays = STAGE_FUNCTIONS[stage](problem, results, arrays)
            timings[stage] = time.perf_counter() - t0
            cache.put(stage, result, stage_arrays)
            log(f"{stage}: {timings[stage]:.1f} s")
        results[stage] = result
        arrays.update(stage_arrays)
    return ModelAnalysis(results, timings, problem.loss, problem.num_samples, problem.num_params, settings.to_dict(),
                         ranks.world, arrays)

"""``landscape-kernels analyse``: the noise and curvature report of your own model (``docs/analyse.md``).

The model comes from a preset or from ``--model module:function``; ``--checkpoint FILE`` loads weights
into it, ``--checkpoints DIR`` analyses every checkpoint of a folder in order and adds every scalar as
a curve along training. Each checkpoint's finished stages are kept (``OUT/stages/`` or
``OUT/checkpoints/FILE/``), so ``--resume`` skips them.

Under ``torchrun --nproc_per_node R landscape-kernels analyse ...`` every process builds the same model
and samples, takes its contiguous share of the samples, and the products are combined over the ranks:
the numbers are those of one process (up to rounding); rank 0 writes the folder.
"""
import os
from dataclasses import dataclass, replace

import torch.distributed as dist

from ..analyses.analyse import GROUPS, STAGES, AnalyseSettings, analyse
from ..analyses.analyse.settings import KFAC_LOSSES
from ..training.checkpoints import checkpoint_series, load_checkpoint
from ..training.presets import PRESETS
from .job import Job, option
from .reports.analyse import write_analyse_report
from .torchrun import rank_device, torchrun_group
from .user_model import DTYPES, build_user_model, prepared, rank_share


@dataclass
class AnalyseConfig:
    preset: str = option(None, "a built-in model that runs offline", type=str, choices=tuple(PRESETS))
    model: str = option(None, "MODULE:FUNCTION returning (model, loss_fn, data); MODULE importable or a .py path", type=str)
    checkpoint: str = option(None, "a state_dict file (torch.save, read with weights_only=True) or .safetensors", type=str)
    checkpoints: str = option(None, "a folder of checkpoints: analyse each, in name order, with curves", type=str)
    samples: int = option(None, "analyse the first N samples (default: all the data)", type=int)
    device: str = option("cpu", "torch device")
    dtype: str = option(None, "float32 or float64 (default: the model's)", type=str, choices=tuple(DTYPES))
    what: tuple = option(("all",), f"stages: {', '.join(STAGES)}; or {', '.join(GROUPS)}", type=str)
    top_k: int = option(10, "eigenpairs of the Hessian, the GGN and the noise covariance")
    density_probes: int = option(8, "SLQ probes")
    surface_points: int = option(21, "points per side of the 2-D surface")
    surface_directions: str = option("random", "the surface's axes: filter-normalised random or top Hessian",
                                     choices=("random", "hessian"))
    landscape_method: str = option("auto", "how the profiles and the surface evaluate points: timed both ways (auto), "
                                   "many per model pass (batched), or one by one (loop)",
                                   choices=("auto", "batched", "loop"))
    keep_graph: bool = option(False, "keep each batch's gradient graph across Hessian products (faster, more memory)")
    kfac_loss: str = option("cross_entropy", "the loss of the kfac stage (KFAC and EKFAC against the exact spectrum), "
                            "checked against the model's", choices=KFAC_LOSSES)
    seed: int = option(0, "seed of every random draw", minimum=0)
    quick: bool = option(False, "fewer eigenpairs, probes and points: a first look in seconds")

    def resolved(self):
        if (self.preset is None) == (self.model is None):
            raise ValueError("analyse: give exactly one of --preset (one of "
                             f"{', '.join(PRESETS)}) and --model MODULE:FUNCTION")
        if self.checkpoint and self.checkpoints:
            raise ValueError("analyse: give --checkpoint FILE or --checkpoints DIR, not both")
        bad = [w for w in self.what if w not in STAGES and w not in GROUPS]
        if bad or not self.what:
            raise ValueError(f"analyse: --what {','.join(self.what)!r}: choose from {', '.join(STAGES)} or "
                             f"{', '.join(GROUPS)}")
        return replace(self)

    def settings(self):
        s = AnalyseSettings(top_k=self.top_k, density_probes=self.density_probes, surface_points=self.surface_points,
                            surface_directions=self.surface_directions, landscape_method=self.landscape_method,
                            keep_graph=self.keep_graph, kfac_loss=self.kfac_loss, seed=self.seed)
        return (s.quick() if self.quick else s).checked()


class AnalyseJob(Job):
    """Noise and curvature report of your own model or checkpoints: Hessian and GGN eigenpairs, spectral
    density, trace, per-layer curvature, gradient noise scale and spectrum, noise against curvature, loss
    profiles and a 2-D surface."""

    name = "analyse"
    config = AnalyseConfig
    report = write_analyse_report
    page = "docs/analyse.md"
    trains = False

    def writes_files(self):
        return not dist.is_initialized() or dist.get_rank() == 0

    def main(self, args):
        with torchrun_group(args.device):  # under torchrun: the ranks' group, for the whole command
            return super().main(args)

    def compute(self, cfg, ctx):
        user = prepared(build_user_model(cfg.preset, cfg.model), cfg.samples, rank_device(cfg.device), cfg.dtype)
        if dist.is_initialized():
            user = user._replace(batches=rank_share(user.batches, dist.get_rank(), dist.get_world_size()))
        settings = cfg.settings()
        files = checkpoint_series(cfg.checkpoints) if cfg.checkpoints else [cfg.checkpoint] if cfg.checkpoint else [None]
        series = []
        for i, path in enumerate(files):
            if path is not None:
                load_checkpoint(user.model, path)
                user.model.eval()
            name = os.path.splitext(os.path.basename(path))[0] if path else None
            # by the whole file name: step_1.pt and step_1.safetensors keep their stages apart
            folder = ctx.path("checkpoints", os.path.basename(path)) if cfg.checkpoints else ctx.path("stages")
            if len(files) > 1:
                ctx.log(f"checkpoint {i + 1}/{len(files)}: {path}")
            result = analyse(user.model, user.loss_fn, user.batches, what=list(cfg.what), params=user.params,
                             output_fn=user.output_fn, settings=settings, cache_dir=folder, resume=ctx.resume,
                             progress=ctx.progress, log=ctx.log)
            for stage, seconds in result.timings_s.items():
                ctx.timer.seconds[stage] = ctx.timer.seconds.get(stage, 0.0) + seconds
            if cfg.checkpoints:
                series.append({"checkpoint": name, **result.scalars()})
        summary = {"model": user.source, "checkpoint": cfg.checkpoint, "checkpoints": files if cfg.checkpoints else None,
                   **result.to_dict(), "series": series or None}
        return summary, result.arrays

    def headline(self, summary):
        st = summary["stages"]
        parts = []
        if "hessian" in st:
            parts.append(f"lambda_1 {st['hessian']['eigenvalues'][0]:.4g}")
        if "trace" in st:
            parts.append(f"tr H {st['trace']['trace']:.4g}")
        if "noise" in st:
            parts.append(f"B_simple {st['noise']['b_simple']:.4g}")
        return ", ".join(parts) or "done"


JOB = AnalyseJob()

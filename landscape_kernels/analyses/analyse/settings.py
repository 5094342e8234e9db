"""The settings of ``analyse``: how many eigenpairs, probes, points; one dataclass with a quick variant."""
import math
from dataclasses import asdict, dataclass, fields, replace

from ...operators.loss_hessian import LOSSES as KFAC_LOSSES

STAGES = ("hessian", "ggn", "density", "trace", "layers", "noise", "overlap", "profiles", "surface", "kfac")
GROUPS = {
    "all": STAGES[:-1],  # kfac is asked for by name: it needs a cross-entropy or squared-error loss
    "curvature": ("hessian", "ggn", "density", "trace", "layers"),
    "landscape": ("profiles", "surface"),
}
SURFACE_DIRECTIONS = ("random", "hessian")
LANDSCAPE_METHODS = ("auto", "batched", "loop")


@dataclass
class AnalyseSettings:
    """What each stage computes (``docs/analyse.md`` explains every number).

    top_k: eigenpairs of the Hessian, the GGN and the noise covariance; tol: Lanczos stops when every
    wanted residual estimate is below tol x the largest Ritz value; density_probes, density_steps: SLQ
    probes and Lanczos steps per probe; trace_products: Hutch++ products; frobenius_probes: probes of
    ||H||_F; layer_tol, layer_steps: the per-layer top eigenvalue (looser: a ranking of the layers);
    profile_points: offsets per 1-D profile; profile_rise: the eigen-direction profiles span the
    offsets where the quadratic model along the top eigenvector rises by this much (capped at the
    weights' norm); random_directions: filter-normalised random directions (Li et al. 2018), profiled
    over [-1, 1]; surface_points: the 2-D grid's points per side; surface_directions: "random" (the
    first two random directions) or "hessian" (the top two eigenvectors, over the eigen range);
    landscape_method: how the profiles and the surface evaluate their points: "batched" (many points
    per pass of the model, ``loss_profiles``), "loop" (the weights written and the model run once per
    point) or "auto" (each stage times both on its first points and keeps the faster); keep_graph: keep each batch's gradient graph across Hessian products (faster, more memory); kfac_loss: the loss
    the kfac stage assumes ("cross_entropy" or "mse", checked against loss_fn); seed:
    every random draw."""

    top_k: int = 10
    tol: float = 1e-4
    density_probes: int = 8
    density_steps: int = 60
    trace_products: int = 99
    frobenius_probes: int = 30
    layer_tol: float = 1e-3
    layer_steps: int = 30
    profile_points: int = 21
    profile_rise: float = 1.0
    random_directions: int = 2
    surface_points: int = 21
    surface_directions: str = "random"
    landscape_method: str = "auto"
    keep_graph: bool = False
    kfac_loss: str = "cross_entropy"
    seed: int = 0

    def quick(self):
        """Fewer eigenpairs, probes and points: a first look in seconds."""
        return replace(self, top_k=min(self.top_k, 5), tol=max(self.tol, 1e-3), density_probes=min(self.density_probes, 4),
                       density_steps=min(self.density_steps, 30), trace_products=min(self.trace_products, 30),
                       frobenius_probes=min(self.frobenius_probes, 10), layer_steps=min(self.layer_steps, 15),
                       profile_points=min(self.profile_points, 11), surface_points=min(self.surface_points, 9))

    def checked(self):
        """``self`` when every setting is valid, else a ValueError naming it."""
        least = {"top_k": 1, "density_probes": 1, "density_steps": 2, "trace_products": 6, "frobenius_probes": 2,
                 "layer_steps": 1, "profile_points": 3, "random_directions": 0, "surface_points": 3, "seed": 0}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in least and (isinstance(v, bool) or not isinstance(v, int) or v < least[f.name]):
                raise ValueError(f"analyse: {f.name} must be an int >= {least[f.name]}, got {v!r}")
            if f.name in ("tol", "layer_tol", "profile_rise") and (
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise ValueError(f"analyse: {f.name} must be a finite number > 0, got {v!r}")
        if self.surface_directions not in SURFACE_DIRECTIONS:
            raise ValueError(f"analyse: surface_directions must be one of {SURFACE_DIRECTIONS}, got {self.surface_directions!r}")
        if self.surface_directions == "random" and self.random_directions < 2:
            raise ValueError("analyse: surface_directions='random' needs random_directions >= 2")
        if self.landscape_method not in LANDSCAPE_METHODS:
            raise ValueError(f"analyse: landscape_method must be one of {LANDSCAPE_METHODS}, got {self.landscape_method!r}")
        if self.kfac_loss not in KFAC_LOSSES:
            raise ValueError(f"analyse: kfac_loss must be one of {KFAC_LOSSES}, got {self.kfac_loss!r}")
        if self.keep_graph not in (True, False):
            raise ValueError(f"analyse: keep_graph must be True or False, got {self.keep_graph!r}")
        return self

    def to_dict(self):
        return asdict(self)


# which stages a stage needs the vectors of
NEEDS = {"overlap": ("hessian", "noise"), "profiles": ("hessian",)}


def resolve_stages(what, settings):
    """The stages to run, in order: ``what`` (a stage, a group name, or a list of them) with the stages
    their results need (the overlap needs the Hessian and noise eigenvectors, the eigen-direction
    profiles and a "hessian" surface the Hessian's)."""
    names = [what] if isinstance(what, str) else list(what)
    if not names:
        raise ValueError(f"analyse: what names no stage; choose from {STAGES} or {tuple(GROUPS)}")
    wanted = set()
    for name in names:
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in STAGES:
            wanted.add(name)
        else:
            raise ValueError(f"analyse: what: unknown stage {name!r}; choose from {STAGES} or {tuple(GROUPS)}")
    for name in list(wanted):
        wanted.update(NEEDS.get(name, ()))
    if "surface" in wanted and settings.surface_directions == "hessian":
        wanted.add("hessian")
    return [s for s in STAGES if s in wanted]

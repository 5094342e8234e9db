"""The package's shape (docs/architecture.md): one layer per subpackage, imports only point down the
layers, no import cycles, and no module imports another module's underscored names."""
import ast
import os

import pytest

import landscape_kernels

PACKAGE = os.path.dirname(landscape_kernels.__file__)
# bottom to top: a module may import from its own layer and the layers before it
LAYERS = ["version", "kernels", "capture", "operators", "linalg", "trajectory", "training", "analyses", "reproduce",
          "cli", "__init__"]
EXTENSION_MODULES = {"_C"}  # the compiled extension (a shared library, not a .py module)


def _modules():
    """{dotted module name: path} of every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, name)
    return out


MODULES = _modules()


def _is_package(module):
    return MODULES[module].endswith("__init__.py")


def _imports(module):
    """[(imported module, imported names, line)] of every import in ``module`` (functions' too) that
    reaches into the package."""
    tree = ast.parse(open(MODULES[module]).read())
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("landscape_kernels")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("landscape_kernels"):
                target = node.module
            else:
                continue
            names = [a.name for a in node.names]
            found += [(f"{target}.{n}", [], node.lineno) for n in names if f"{target}.{n}" in MODULES]
            objects = [n for n in names if f"{target}.{n}" not in MODULES  # names defined in the target itself
                       and n not in EXTENSION_MODULES]
            if objects:
                found.append((target, objects, node.lineno))
    return found


def _layer(module):
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    mine = LAYERS.index(_layer(module))
    for target, _, line in _imports(module):
        theirs = LAYERS.index(_layer(target))
        assert theirs <= mine, (f"{module} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]}) at line "
                                f"{line}: imports must point down {' < '.join(LAYERS)}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_an_underscored_name_of_another(module):
    for target, names, line in _imports(module):
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{module} imports {private} from {target} at line {line}: make them public"


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in _imports(m) if t in MODULES and t != m}) for m in MODULES}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_layer_is_a_subpackage_or_a_top_module():
    tops = {_layer(m) for m in MODULES}
    assert tops == set(LAYERS), f"modules outside the layers: {sorted(tops - set(LAYERS))}"
    for layer in LAYERS[1:-2]:
        assert _is_package(f"landscape_kernels.{layer}"), f"{layer} must be a subpackage"


def test_the_public_names_stay():
    """Every name ``import landscape_kernels as lk`` gave before the package was layered, and then some."""
    names = ["PerSampleGradients", "lanczos_eigs", "EigenResult", "spectral_density", "SpectralDensity",
             "hutchinson_trace", "hutchpp_trace", "frobenius_norm", "HessianOperator", "GGNOperator",
             "NoiseCovarianceOperator", "FisherOperator", "TrajectoryRecorder", "open_trajectory",
             "open_sharded_trajectory", "StreamingPCA", "loss_profiles", "flatness", "FlatnessResult",
             "SharpnessTracker", "NSGD", "ops", "reference", "info", "__version__",
             "DistributedOperator", "distributed_moments", "distributed_gram", "sharded_pca", "rank_trajectory_store"]
    missing = [n for n in names if not hasattr(landscape_kernels, n)]
    assert not missing and set(names) <= set(landscape_kernels.__all__) | {"__version__"}, missing
    for op in landscape_kernels.ops.SCHEMAS:
        assert callable(getattr(landscape_kernels.ops, op)) and callable(getattr(landscape_kernels.reference, op))

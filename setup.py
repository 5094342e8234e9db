"""Build of landscape_kernels.kernels._C (CPU kernels always; CUDA kernels when torch and a toolkit have CUDA).

Environment switches:
  LANDSCAPE_KERNELS_NO_EXT=1      build nothing: the package runs on its pure-torch reference ops
  LANDSCAPE_KERNELS_NO_CUDA=1     build the CPU kernels only
  LANDSCAPE_KERNELS_FORCE_CUDA=1  build the CUDA kernels even when torch sees no GPU (needs nvcc)
Build it with `pip install --no-build-isolation .` (or `-e .`) so that the torch already installed is
used: an extension must be compiled against the torch it runs with. Under pip's default build isolation
torch is not importable; the package is then built without the extension (reference ops only), and
`landscape-kernels info` says how to get the compiled kernels.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("LANDSCAPE_KERNELS_NO_EXT"):
        print("landscape_kernels build: LANDSCAPE_KERNELS_NO_EXT=1, no compiled extension (reference ops only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("landscape_kernels build: WARNING: torch is not importable in this build environment (pip's build "
              "isolation?), so no compiled extension is built and the package will run on its pure-torch reference "
              "ops. For the compiled kernels install torch first, then: pip install --no-build-isolation .")
        return [], {}

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))  # relative: setuptools requires it
    has_toolkit = cpp_extension.CUDA_HOME is not None
    torch_has_cuda = torch.version.cuda is not None
    if _flag("LANDSCAPE_KERNELS_NO_CUDA"):
        with_cuda, why = False, "LANDSCAPE_KERNELS_NO_CUDA=1"
    elif _flag("LANDSCAPE_KERNELS_FORCE_CUDA"):
        if not (has_toolkit and torch_has_cuda):
            raise RuntimeError(
                "LANDSCAPE_KERNELS_FORCE_CUDA=1 but "
                + ("torch is a CPU-only build" if not torch_has_cuda else "no CUDA toolkit (nvcc / CUDA_HOME) was found")
            )
        with_cuda, why = True, "LANDSCAPE_KERNELS_FORCE_CUDA=1"
    else:
        with_cuda = has_toolkit and torch_has_cuda
        why = "auto: torch CUDA %s, toolkit %s" % (torch.version.cuda, cpp_extension.CUDA_HOME)

    # -fno-trapping-math changes no result (FP traps are never enabled); it lets loops with min/max vectorise
    cxx = ["-O2", "-g0", "-fopenmp", "-fno-trapping-math"]  # cpp_extension adds the C++ standard torch needs
    nvcc = ["-O2", "-Xcompiler", "-fopenmp"]
    macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("LANDSCAPE_KERNELS_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    print(
        "landscape_kernels build: torch %s, CPU kernels yes, CUDA kernels %s (%s), flags %s, sources %s"
        % (torch.__version__, "yes" if with_cuda else "no", why, " ".join(cxx), ", ".join(sources))
    )
    ext = ext_cls(
        "landscape_kernels.kernels._C",
        sources,
        include_dirs=[os.path.join(HERE, "landscape_kernels", "kernels")],  # schemas.def, the op table
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

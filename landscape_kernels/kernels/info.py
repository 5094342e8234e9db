"""What the package runs on: build, backends per device, threads, CUDA device."""
import torch

from ..version import __version__
from . import ops


def info():
    """A dict describing the active backends (compiled CPU, compiled CUDA, reference) and the runtime."""
    compiled = ops.compiled_devices()
    cuda_available = torch.cuda.is_available()
    backends = {"cpu": ops.active_backend("cpu")}
    backends["cuda"] = ops.active_backend("cuda") if cuda_available else "no CUDA device"
    return {
        "landscape_kernels": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "extension": "loaded" if ops.EXTENSION_ERROR is None else f"not loaded ({ops.EXTENSION_ERROR})",
        "compiled_kernels": compiled,
        "backend_setting": ops.backend_setting(),
        "backends": backends,
        "cuda_device": torch.cuda.get_device_name() if cuda_available else None,
    }


def format_info(d):
    lines = [f"landscape_kernels {d['landscape_kernels']}  (torch {d['torch']}, CUDA {d['torch_cuda'] or 'none'})"]
    lines.append(f"extension:        {d['extension']}")
    lines.append(f"compiled kernels: {', '.join(d['compiled_kernels']) or 'none'}")
    lines.append(f"backend setting:  {d['backend_setting']}")
    for device, backend in d["backends"].items():
        lines.append(f"  {device:5s} -> {backend}")
    lines.append(f"threads:          {d['threads']}")
    lines.append(f"cuda device:      {d['cuda_device'] or 'none'}")
    return "\n".join(lines)

"""What this installation of genkernels holds and can run."""

from __future__ import annotations

from typing import Any

import torch

from . import _backend, _C


def info() -> dict[str, Any]:
    """The version, the modules built, whether CUDA can run now, the CUDA architectures
    compiled, and the CPU kernels' instruction set ("baseline", "avx2", "avx512", or "amx": the
    AVX-512 kernels with attention on AMX tiles; GENKERNELS_CPU_ISA caps it) and thread
    count."""
    cuda = _backend._C_cuda
    devices = cuda.device_count() if cuda is not None else 0
    return {
        "version": _C.__version__,
        "modules": {
            "_C": True,
            "_C_cuda": cuda is not None,
            "_C_emu": _backend._C_emu is not None,
        },
        "cuda_available": bool(devices > 0 and torch.cuda.is_available()),
        "cuda_devices": devices,
        "cuda_archs": [f"sm_{a}" for a in cuda.archs.split(",")] if cuda is not None else [],
        "cuda_import_error": _backend.CUDA_IMPORT_ERROR if cuda is None else None,
        "cpu_isa": _C.cpu_isa(),
        "cpu_isas_built": _C.cpu_isas_built.split(","),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }

"""The CUDA sources compile warning-free with nvcc for sm_80 and sm_90, no hot kernel spills
or has a stack frame, and the resource table lists every kernel (scripts/cuda_resources.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cuda_resources.py"


def find_nvcc() -> Optional[str]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import cuda_resources
    finally:
        sys.path.pop(0)
    return cuda_resources.find_nvcc()


def kernel_families() -> set[str]:
    sources = (ROOT / "csrc").rglob("*.cu")
    return {name for cu in sources for name in re.findall(r"__global__ void (\w+)", cu.read_text())}


def test_kernels_compile_without_spills_and_are_all_listed(tmp_path: Path) -> None:
    if find_nvcc() is None:
        pytest.skip("nvcc not found (on PATH, $CUDACXX or /usr/local/cuda/bin)")
    out = tmp_path / "cuda_resources.txt"
    result = subprocess.run([sys.executable, str(SCRIPT), "--check", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    listed = set()
    for line in out.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kernel, arch = line.split()[:2]
            # gk::(anonymous)::normal_kernel<float> -> normal_kernel
            listed.add((kernel.split("<", 1)[0].rsplit("::", 1)[-1], arch))
    families = kernel_families()
    assert families, "no __global__ kernels found under csrc"
    missing = sorted(f"{name} ({arch})" for name in families for arch in ("sm_80", "sm_90")
                     if (name, arch) not in listed)
    assert not missing, f"kernels missing from the table: {missing}"

"""The emulated CUDA kernels under AddressSanitizer and UndefinedBehaviorSanitizer: an
out-of-bounds access or undefined behaviour in any CUDA kernel fails this test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import genkernels

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("GK_SANITIZED") == "1" or genkernels._backend._C_emu is None,
    reason="runs once, where the emulated CUDA module is built (GENKERNELS_EMULATION=ON)",
)


def _runtime(name: str) -> str:
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        pytest.skip(f"{name} is not installed with g++")
    return path


SUITES = ("test_positional.py", "test_sampling.py", "test_attention.py", "test_attention_backward.py",
          "test_attention_dropout.py")


@pytest.fixture(scope="module")
def sanitized_package(tmp_path_factory) -> Path:
    """A copy of the installed package whose _C_emu is built with -fsanitize=address,undefined."""
    import pybind11

    build = tmp_path_factory.mktemp("asan-build")
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
        "-DGENKERNELS_CUDA=OFF", "-DGENKERNELS_EMULATION=ON", "-DGENKERNELS_SANITIZE=ON",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
    ]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "_C_emu"], check=True, capture_output=True, text=True)
    package = tmp_path_factory.mktemp("asan-site") / "genkernels"
    shutil.copytree(Path(genkernels.__file__).parent, package, ignore=shutil.ignore_patterns("_C_emu*", "__pycache__"))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    shutil.copy(build / f"_C_emu{suffix}", package / f"_C_emu{suffix}")
    return package.parent


def test_emulated_kernels_are_clean_under_sanitizers(sanitized_package):
    env = dict(
        os.environ,
        GK_SANITIZED="1",
        PYTHONPATH=str(sanitized_package),
        LD_PRELOAD=_runtime("libasan.so"),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    check = subprocess.run(
        [sys.executable, "-c", "import genkernels, sys; print(genkernels._backend._C_emu.__file__)"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert check.stdout.startswith(str(sanitized_package))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "emulated",
         *(str(ROOT / "tests" / name) for name in SUITES)],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

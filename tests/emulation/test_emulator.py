"""Self-tests of the CUDA emulator (csrc/common/emulate.h).

Builds the C++ self-test program of this directory with g++ twice, plainly
optimised and with AddressSanitizer + UBSan, caching each build under the
system temp directory keyed by its inputs, and runs it: one pytest case per
GK_TEST, plus the checks that need a fresh process (environment settings,
a stack overflow) and a compile of the PTX wrappers with nvcc.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
CUDA_INCLUDE = CUDA_HOME / "include"

SOURCES = [
    "main.cpp",
    "block_tests.cu",
    "warp_tests.cu",
    "numeric_tests.cu",
    "ptx_tests.cu",
    "bench.cu",
    "nvcc_wrappers.cu",
]
COMPILE_FLAGS = [
    "-std=c++20",
    "-x",
    "c++",
    "-DGK_EMULATE",
    "-include",
    str(CSRC / "common" / "emulate.h"),
    "-isystem",
    str(CUDA_INCLUDE),
    f"-I{CSRC}",
    "-Wall",
    "-Wextra",
    "-Wshadow",
    "-Werror",
    "-fstack-clash-protection",
    "-pthread",
]
VARIANT_FLAGS = {
    "release": ["-O2"],
    "sanitized": [
        "-O1",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer",
    ],
}
# -rdynamic puts the kernels in the dynamic symbol table, so faults name them.
LINK_FLAGS = ["-rdynamic", "-pthread"]

TEST_NAMES = sorted(
    name
    for source in SOURCES
    for name in re.findall(r"^GK_TEST\((\w+)\)", (HERE / source).read_text(), re.M)
)


def _missing_toolchain() -> str | None:
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if not (CUDA_INCLUDE / "cuda_fp16.h").is_file():
        return f"no CUDA headers in {CUDA_INCLUDE}"
    return None


def _digest(flags: list[str]) -> str:
    """Identifies a build: compiler, flags, CUDA headers and every source it reads."""
    h = hashlib.sha256()
    h.update(subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.encode())
    h.update("\0".join(flags).encode())
    fp16 = CUDA_INCLUDE / "cuda_fp16.hpp"
    h.update(f"{fp16}:{fp16.stat().st_mtime_ns}".encode())
    inputs = sorted((CSRC / "common").glob("emulate*.h")) + [CSRC / "common" / f for f in ("launch.h", "ptx.h")]
    inputs += sorted(HERE.glob("*.h")) + [HERE / s for s in SOURCES]
    for path in inputs:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _build(variant: str) -> Path:
    """Compiles and links one variant, or returns the cached executable."""
    if reason := _missing_toolchain():
        pytest.skip(reason)
    flags = COMPILE_FLAGS + VARIANT_FLAGS[variant]
    cache = Path(tempfile.gettempdir()) / "gk_emulation_selftest" / f"{variant}-{_digest(flags)}"
    exe = cache / "selftest"
    if exe.is_file():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        work = Path(tmp)

        def compile_one(source: str) -> Path:
            obj = work / f"{source}.o"
            cmd = ["g++", *flags, "-c", str(HERE / source), "-o", str(obj)]
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
            return obj

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_one, SOURCES))
        linked = work / "selftest"
        cmd = ["g++", *VARIANT_FLAGS[variant], *LINK_FLAGS, *map(str, objects), "-o", str(linked)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
        os.replace(linked, exe)  # atomic: concurrent sessions see a whole file or none
    return exe


@pytest.fixture(scope="session")
def release() -> Path:
    return _build("release")


@pytest.fixture(scope="session")
def sanitized() -> Path:
    return _build("sanitized")


def _run(exe: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("name", TEST_NAMES)
def test_selftest(release: Path, name: str) -> None:
    result = _run(release, name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"PASS {name}")


def test_selftests_under_address_and_ub_sanitizers(sanitized: Path) -> None:
    result = _run(sanitized, env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("PASS ") == len(TEST_NAMES), output


def _first_run_order(exe: Path, setting: str) -> list[int]:
    result = _run(exe, "report_order", env={"GK_EMU_ORDER": setting})
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("order:"))
    return [int(v) for v in line.split()[1:]]


def test_order_from_environment(release: Path) -> None:
    # 3 blocks of 8 threads, listed by global thread index in the order they first ran.
    assert _first_run_order(release, "forward") == list(range(24))
    assert _first_run_order(release, "reverse") == list(range(23, -1, -1))
    seeded = _first_run_order(release, "random:7")
    assert sorted(seeded) == list(range(24)) and seeded not in (list(range(24)), list(range(23, -1, -1)))
    assert _first_run_order(release, "random:7") == seeded
    assert _first_run_order(release, "random:8") != seeded
    # Blocks run whole, in a random order of their own.
    assert all(len({v // 8 for v in seeded[b * 8 : b * 8 + 8]}) == 1 for b in range(3))


@pytest.mark.parametrize("setting", ["sideways", "reverse:3", "random:x"])
def test_invalid_order_setting_rejected(release: Path, setting: str) -> None:
    result = _run(release, "report_order", env={"GK_EMU_ORDER": setting})
    assert result.returncode != 0
    assert "GK_EMU_ORDER" in result.stdout


def test_stack_overflow_hits_guard_page(release: Path) -> None:
    result = _run(release, "stack_overflow")
    assert result.returncode == -signal.SIGSEGV, result.stdout + result.stderr


def test_emulation_costs(release: Path) -> None:
    """Reports the costs; the bounds are loose, so that slow CI machines pass."""
    result = _run(release, "bench")
    assert result.returncode == 0, result.stdout + result.stderr
    costs = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", result.stdout)}
    print(f"\nemulation costs: {costs}")
    assert costs["syncthreads_ns"] < 1000
    assert costs["shuffle_ns"] < 1000
    assert costs["matmul_4x128_ms"] < 200


def test_ptx_wrappers_compile_with_nvcc(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc") or str(CUDA_HOME / "bin" / "nvcc")
    if not Path(nvcc).is_file():
        pytest.skip("nvcc is not installed")
    cmd = [
        nvcc,
        "-arch=sm_80",
        "-std=c++20",
        f"-I{CSRC}",
        "-Werror",
        "all-warnings",
        "-c",
        str(HERE / "nvcc_wrappers.cu"),
        "-o",
        str(tmp_path / "nvcc_wrappers.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"

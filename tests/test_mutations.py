"""Mutation tests: the emulated CUDA checks catch real bugs in the kernels.

Each mutation edits one real kernel source (the pattern must occur exactly once, so a change of
the source breaks the test loudly), compiles it with exactly the flags of genkernels._C_emu into
its own extension module, and runs a check against genkernels.reference on it inside
``genkernels.emulated_cuda()``. The check must fail (wrong values, a write outside the output,
or an emulation fault raised as RuntimeError) in at least one thread order, while the unmutated
build of the same sources passes it in every order.

The attention kernels' mutations plant the bugs of tensor-core code: a wrong mma fragment
layout (in the shared header, compiled into the forward), a read of a cp.async-staged tile
before waiting for it, a missing barrier between staging a tile and reading it, and in the backward a query tile
read before its copies land, a gradient formula missing a term, and the fused dQ product reading dS before
every warp has stored its share.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import math
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import pytest
import torch

import genkernels
from genkernels import _backend, reference

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted(CSRC.glob("*/*_cuda.cu"))  # csrc/<family>/<family>_cuda.cu, as in CMakeLists.txt
BINDINGS = CSRC / "bindings" / "cuda_module.cpp"
# Every build gets the same module name in its own folder, so the bindings compile only once.
MODULE = "_C_mut"
ORDERS = ("forward", "reverse", "random:12345")

# The emulator reads GK_EMU_ORDER once per module; this lets a test switch orders between checks.
ORDER_CONTROL = r"""
#include <string_view>
extern "C" [[gnu::visibility("default")]] int gk_test_set_thread_order(const char* order, unsigned long long seed) {
  const std::string_view name(order);
  if (name == "forward") gk_emu::set_thread_order(gk_emu::Order::forward);
  else if (name == "reverse") gk_emu::set_thread_order(gk_emu::Order::reverse);
  else if (name == "random") gk_emu::set_thread_order(gk_emu::Order::random, seed);
  else return -1;
  return 0;
}
"""


def cuda_include() -> Optional[Path]:
    """The CUDA headers the emulator builds against (cuda_fp16.h and friends), found as CMake does."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return next((Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_fp16.h").exists()), None)


def compile_flags(include: Path) -> list[str]:
    """The compile flags of _C_emu (CMakeLists.txt), link-time optimisation aside."""
    import pybind11

    return [
        "-std=c++20", "-DGK_EMULATE", f"-DGK_MODULE_NAME={MODULE}", '-DGK_CUDA_ARCHS="emulated"',
        "-include", str(CSRC / "common" / "emulate.h"),
        "-fstack-clash-protection", "-O1", "-g", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
        "-Wall", "-Wextra", "-Wshadow", "-fPIC", "-fvisibility=hidden", "-pthread",
        f"-I{CSRC}", f"-I{include}", "-isystem", sysconfig.get_paths()["include"], "-isystem", pybind11.get_include(),
    ]


@dataclass(frozen=True)
class Mutation:
    name: str
    source: str  # relative to the repository root: a kernel source, or a header it includes
    old: str
    new: str
    check: Callable[[], None]
    expected: type[Exception]  # AssertionError: wrong values or stray writes; RuntimeError: an emulation fault
    match: str = ""  # a regular expression the failure's message must contain
    unit: str = ""  # for a header: the kernel source to compile against it (relative to the root)

    def apply(self) -> str:
        text = (ROOT / self.source).read_text()
        count = text.count(self.old)
        assert count == 1, f"{self.source}: expected {self.old!r} exactly once, found it {count} times"
        return text.replace(self.old, self.new)


class Builds:
    """Compiles each unchanged translation unit once and links one module per mutation."""

    def __init__(self, root: Path, flags: list[str]) -> None:
        self.root, self.flags = root, flags
        self.modules: dict[str, ModuleType] = {}
        (root / "order_control.cpp").write_text(ORDER_CONTROL)
        sources = [BINDINGS, root / "order_control.cpp", *KERNEL_SOURCES]
        with ThreadPoolExecutor(max_workers=2) as pool:
            self.objects = dict(zip(sources, pool.map(lambda s: self.compile(s, root / f"{s.stem}.o"), sources)))

    def compile(self, source: Path, obj: Path, include: Optional[Path] = None) -> Path:
        first = [f"-I{include}"] if include is not None else []  # searched before csrc
        result = subprocess.run(["g++", *first, *self.flags, "-x", "c++", "-c", str(source), "-o", str(obj)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"compiling {source} failed:\n{result.stderr}"
        return obj

    def module(self, name: str, mutation: Optional[Mutation] = None) -> ModuleType:
        if name in self.modules:
            return self.modules[name]
        folder = self.root / name
        folder.mkdir()
        objects = dict(self.objects)
        if mutation is not None:
            # The mutated file sits at its csrc path under the folder, which the compiler searches
            # first: a mutated header shadows the original for the unit that includes it.
            mutated = folder / Path(mutation.source).relative_to("csrc")
            mutated.parent.mkdir(parents=True, exist_ok=True)
            mutated.write_text(mutation.apply())
            unit = ROOT / (mutation.unit or mutation.source)
            objects[unit] = self.compile(unit if mutation.unit else mutated, folder / f"{unit.stem}.o", include=folder)
        path = folder / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
        result = subprocess.run(["g++", "-shared", "-pthread", *map(str, objects.values()), "-o", str(path)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"linking {path} failed:\n{result.stderr}"
        # pybind11 caches modules by qualified name, and Python finds PyInit_<last component>.
        spec = importlib.util.spec_from_file_location(f"mutants.{name}.{MODULE}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.modules[name] = module
        return module


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    include = cuda_include()
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h), as the emulated CUDA module does")
    return Builds(tmp_path_factory.mktemp("mutants"), compile_flags(include))


def set_thread_order(module: ModuleType, order: str) -> None:
    name, _, seed = order.partition(":")
    set_order = ctypes.CDLL(module.__file__).gk_test_set_thread_order  # the already loaded module
    assert set_order(name.encode(), ctypes.c_ulonglong(int(seed or 0))) == 0, order


def failure(check: Callable[[], None], module: ModuleType, order: str) -> Optional[Exception]:
    """What `check` raises on `module` in `order`, or None if it passes."""
    set_thread_order(module, order)
    try:
        with genkernels.emulated_cuda():
            check()
    except (AssertionError, RuntimeError) as exc:
        return exc
    return None


# ------------------------------------------------------------------------------------------
# Checks. They call the bindings as the ops do, but on NaN-filled outputs with GUARD elements
# on either side: through the ops, an element left unwritten may hold a stale correct value and
# a write one past the end lands unseen in the allocator's slack.

GUARD = 64
F32 = _backend.DTYPE_CODES[torch.float32]


def guarded(
    n: int, dtype: torch.dtype = torch.float32, fill: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, inner): n elements, NaN or `fill`, in the middle of a NaN-filled buffer."""
    buffer = torch.full((n + 2 * GUARD,), math.nan, dtype=dtype)
    inner = buffer[GUARD:GUARD + n]
    if fill is not None:
        inner.copy_(fill)
    return buffer, inner


def assert_inside(buffer: torch.Tensor) -> None:
    assert buffer[:GUARD].isnan().all() and buffer[-GUARD:].isnan().all(), "write outside the buffer"


def check_sinusoidal() -> None:
    positions = torch.randint(0, 5000, (37,), generator=torch.Generator().manual_seed(1)).float()
    for dim, layout, flip in itertools.product((31, 64), ("interleaved", "concat"), (False, True)):
        buffer, out = guarded(37 * dim)
        run = _backend.launch_for(out)
        run.module.sinusoidal_encoding(run.where, run.stream, out.data_ptr(), positions.data_ptr(), 37, F32, dim,
                                       math.log(10000.0), dim // 2, 1.0, layout == "interleaved", flip)
        assert_inside(buffer)
        expected = reference.sinusoidal_encoding(positions, dim, layout=layout, flip_sin_to_cos=flip)
        torch.testing.assert_close(out.view(37, dim), expected, rtol=0, atol=6e-7)


def check_normal_and_reparameterize() -> None:
    seed, offset = -0x123456789ABCDEF, 2**40 + 7
    seeds = torch.tensor([seed, offset])
    g = torch.Generator().manual_seed(2)
    for n in (5, 1023, 4099):  # not multiples of 4: the last Philox group is cut short
        eps = reference.normal(n, seed, offset)
        buffer, z = guarded(n)
        run = _backend.launch_for(z)
        run.module.normal(run.where, run.stream, z.data_ptr(), n, F32, seeds.data_ptr())
        assert_inside(buffer)
        torch.testing.assert_close(z.double(), eps, rtol=0, atol=4e-6)

        # Guarded inputs too: a kernel reading past their end must not leave the allocation.
        _, mu = guarded(n, fill=torch.randn(n, generator=g))
        _, logvar = guarded(n, fill=0.5 * torch.randn(n, generator=g))
        buffer, z = guarded(n)
        run.module.reparameterize(run.where, run.stream, z.data_ptr(), mu.data_ptr(), logvar.data_ptr(), n, F32,
                                  seeds.data_ptr())
        assert_inside(buffer)
        sigma = (0.5 * logvar.double()).exp()
        # The kernel's noise is within 4e-6 of the float64 reference noise.
        torch.testing.assert_close(z.double(), reference.reparameterize(mu.double(), logvar.double(), eps),
                                   rtol=1e-6, atol=4e-6 * sigma.max().item())


def check_gaussian_kl_sum() -> None:
    n = 100_003  # 25 blocks, the last one partial
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(n, generator=g), torch.randn(n, generator=g)
    run = _backend.launch_for(mu)
    buffer, partials = guarded(-(-n // run.module.KL_CHUNK), torch.float64)
    run.module.gaussian_kl(run.where, run.stream, partials.data_ptr(), mu.data_ptr(), logvar.data_ptr(), n, F32, True)
    assert_inside(buffer)
    expected = reference.gaussian_kl(mu.double(), logvar.double(), reduction="sum")
    torch.testing.assert_close(partials.sum(), expected, rtol=2e-6, atol=0)


def check_attention_tensor_cores() -> None:
    # float16 and bfloat16 with len_q > 4 run the tensor-core kernel: 2 query tiles, 2 key tiles
    # (double-buffered), grouped-query heads, a bottom-right causal band.
    batch, heads_q, heads_kv, len_q, len_kv, dim = 1, 2, 1, 70, 100, 64
    g = torch.Generator().manual_seed(4)
    allowed = torch.arange(len_kv) <= torch.arange(len_q)[:, None] + (len_kv - len_q)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        q = torch.randn(batch, heads_q, len_q, dim, generator=g).to(dtype)
        k = torch.randn(batch, heads_kv, len_kv, dim, generator=g).to(dtype)
        v = torch.randn(batch, heads_kv, len_kv, dim, generator=g).to(dtype)
        buffer, out = guarded(batch * heads_q * len_q * dim, dtype)
        lse_buffer, lse = guarded(batch * heads_q * len_q)
        run = _backend.launch_for(q)
        run.module.attention_forward(
            run.where, run.stream, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            [batch, heads_q, heads_kv, len_q, len_kv, dim, dim], list(q.stride()[:3]), list(k.stride()[:3]),
            list(v.stride()[:3]), 0, _backend.DTYPE_CODES[torch.bool], [0, 0, 0, 0], 0, dim**-0.5, -1, 0, True,
            0.0, 0, _backend.DTYPE_CODES[dtype])
        assert_inside(buffer)
        assert_inside(lse_buffer)
        scores = (q.double() @ k.double().repeat_interleave(heads_q // heads_kv, 1).mT * dim**-0.5)
        scores = scores.masked_fill(~allowed, -math.inf)
        expected = torch.softmax(scores, dim=-1) @ v.double().repeat_interleave(heads_q // heads_kv, 1)
        torch.testing.assert_close(out.view(expected.shape).double(), expected, rtol=0,
                                   atol=tol * expected.abs().max().item())
        torch.testing.assert_close(lse.view(scores.shape[:3]).double(), torch.logsumexp(scores, dim=-1), rtol=1e-5,
                                   atol=1e-5)


def check_attention_backward_tensor_cores() -> None:
    # float16 and bfloat16 gradients from the tensor-core backward kernels: 2 query tiles and 3
    # key tiles (double-buffered in each kernel), grouped-query heads, a causal band.
    batch, heads_q, heads_kv, len_q, len_kv, dim = 1, 2, 1, 70, 100, 64
    g = torch.Generator().manual_seed(5)
    for dtype, tol in ((torch.float16, 4e-3), (torch.bfloat16, 3e-2)):
        tensors = [torch.randn(batch, heads_q, len_q, dim, generator=g), torch.randn(batch, heads_kv, len_kv, dim, generator=g),
                   torch.randn(batch, heads_kv, len_kv, dim, generator=g)]
        dout = torch.randn(batch, heads_q, len_q, dim, generator=g)
        exact_inputs = [t.to(dtype).double().requires_grad_() for t in tensors]
        exact_out, _ = reference.scaled_dot_product_attention(*exact_inputs, is_causal=True, causal_alignment="bottom_right",
                                                              enable_gqa=True)
        exact = torch.autograd.grad(exact_out, exact_inputs, dout.to(dtype).double())
        for deterministic in (False, True):  # dQ fused into the dK, dV kernel, or a kernel of its own
            inputs = [t.to(dtype).requires_grad_() for t in tensors]
            out = genkernels.scaled_dot_product_attention(*inputs, is_causal=True, causal_alignment="bottom_right",
                                                          enable_gqa=True, deterministic=deterministic)
            got = torch.autograd.grad(out, inputs, dout.to(dtype))
            for x, e in zip(got, exact):
                torch.testing.assert_close(x.double(), e, rtol=0, atol=tol * e.abs().max().item())


CHECKS = [check_sinusoidal, check_normal_and_reparameterize, check_gaussian_kl_sum, check_attention_tensor_cores,
          check_attention_backward_tensor_cores]

POSENC = "csrc/posenc/posenc_cuda.cu"
SAMPLING = "csrc/sampling/sampling_cuda.cu"
ATTENTION = "csrc/attention/attention_cuda.cu"
ATTENTION_BACKWARD = "csrc/attention/attention_backward_cuda.cu"
ATTENTION_TILES = "csrc/attention/attention_cuda_tiles.cuh"
MUTATIONS = [
    Mutation("sinusoidal_column_off_by_one", POSENC, "row[spec.stride() * i + spec.sin_offset()]",
             "row[spec.stride() * i + spec.sin_offset() + 1]", check_sinusoidal, AssertionError),
    Mutation("normal_tail_off_by_one", SAMPLING, "if (4 * g + k < n) f(4 * g + k, z[k]);",
             "if (4 * g + k <= n) f(4 * g + k, z[k]);", check_normal_and_reparameterize, AssertionError,
             "outside the buffer"),
    Mutation("kl_reduction_without_barrier", SAMPLING,
             "sums[threadIdx.x] += sums[threadIdx.x + width];\n    __syncthreads();\n",
             "sums[threadIdx.x] += sums[threadIdx.x + width];\n", check_gaussian_kl_sum, AssertionError),
    Mutation("kl_shuffle_half_mask", SAMPLING, "__shfl_down_sync(0xffffffffu, sum, lane_offset)",
             "__shfl_down_sync(0x0000ffffu, sum, lane_offset)", check_gaussian_kl_sum, RuntimeError,
             r"__shfl_down_sync.*mask"),
    Mutation("kl_shuffle_skips_offset_16", SAMPLING, "int lane_offset = 16;", "int lane_offset = 8;",
             check_gaussian_kl_sum, AssertionError),
    Mutation("attention_p_fragment_registers_swapped", ATTENTION_TILES,
             "a[1] = pack<T>(p[2 * kk][2], p[2 * kk][3]);\n    a[2] = pack<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);",
             "a[2] = pack<T>(p[2 * kk][2], p[2 * kk][3]);\n    a[1] = pack<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);",
             check_attention_tensor_cores, AssertionError, unit=ATTENTION),
    Mutation("attention_reads_tile_before_cp_async_wait", ATTENTION_TILES,
             "    cp_async_wait<1>();  // this thread's copies of tile t have landed...\n", "",
             check_attention_tensor_cores, AssertionError, unit=ATTENTION),
    Mutation("attention_tile_without_barrier", ATTENTION_TILES, "    __syncthreads();     // ...and every thread's\n", "",
             check_attention_tensor_cores, AssertionError, unit=ATTENTION),
    Mutation("attention_backward_reads_query_tile_before_cp_async_wait", ATTENTION_BACKWARD,
             "    cp_async_wait<1>();\n    __syncthreads();\n    const T* const tQ", "    __syncthreads();\n    const T* const tQ",
             check_attention_backward_tensor_cores, AssertionError),
    Mutation("attention_backward_ds_without_delta", ATTENTION_BACKWARD,
             "dp[nt][e] = prob * (z * dp[nt][e] - tD[col]);", "dp[nt][e] = prob * z * dp[nt][e];",
             check_attention_backward_tensor_cores, AssertionError),
    Mutation("attention_backward_fused_dq_without_barrier", ATTENTION_BACKWARD,
             "      __syncthreads();  // dS of the whole tile is in sdS\n", "",
             check_attention_backward_tensor_cores, AssertionError),
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_unmutated_build_passes_in_every_order(
    builds: Builds, monkeypatch: pytest.MonkeyPatch, check: Callable[[], None]
) -> None:
    module = builds.module("unmutated")
    monkeypatch.setattr(_backend, "_C_emu", module)
    for order in ORDERS:
        exc = failure(check, module, order)
        assert exc is None, f"{check.__name__} failed in {order} order: {exc!r}"


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_mutation_is_caught(builds: Builds, monkeypatch: pytest.MonkeyPatch, mutation: Mutation) -> None:
    module = builds.module(mutation.name, mutation)
    monkeypatch.setattr(_backend, "_C_emu", module)
    failures = {order: failure(mutation.check, module, order) for order in ORDERS}
    caught = {order: exc for order, exc in failures.items() if exc is not None}
    print(f"{mutation.name}: caught in {sorted(caught) or 'no order'}")
    assert caught, f"{mutation.check.__name__} passes with the mutation {mutation.name} in every thread order"
    for order, exc in caught.items():
        assert isinstance(exc, mutation.expected) and re.search(mutation.match, str(exc)), \
            f"{order}: expected {mutation.expected.__name__} matching {mutation.match!r}, got {exc!r}"

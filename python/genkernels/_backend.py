"""Where a kernel runs: the compiled modules, dtype codes and the launch arguments of a tensor.

The compiled core takes plain integers (data pointers, sizes, a dtype code, and where to run),
so this module is the only bridge between torch tensors and the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from . import _C

DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.bool: 6,
}


def _optional_module(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        return __import__(f"genkernels.{name}", fromlist=[name]), None
    except ImportError as exc:  # not built, or the CUDA runtime cannot load
        return None, str(exc)


_C_cuda, CUDA_IMPORT_ERROR = _optional_module("_C_cuda")
_C_emu, _ = _optional_module("_C_emu")

# A plain flag rather than a context variable, so that torch.compile can trace the ops' checks.
_emulating = False


@contextlib.contextmanager
def emulated_cuda() -> Iterator[None]:
    """Runs the CUDA kernels on CPU tensors through the CPU emulation of CUDA (test builds only)."""
    if _C_emu is None:
        raise RuntimeError("genkernels was built without the emulated CUDA module (GENKERNELS_EMULATION=ON)")
    global _emulating
    previous, _emulating = _emulating, True
    try:
        yield
    finally:
        _emulating = previous


@dataclass(frozen=True)
class Launch:
    """The module that runs a tensor's kernels and the two integers that say where."""

    module: ModuleType
    where: int  # CPU: thread count; CUDA: device index
    stream: int  # CUDA stream handle; 0 on the CPU
    half_types: bool  # whether float16/bfloat16 storage is supported


def launch_for(t: torch.Tensor) -> Launch:
    device = t.device
    if device.type == "cpu":
        if _emulating:
            return Launch(_C_emu, 0, 0, True)
        return _cpu_launch(torch.get_num_threads())
    if device.type == "cuda":
        if _C_cuda is None:
            raise RuntimeError(f"genkernels was built without CUDA support, or its CUDA module failed to load: {CUDA_IMPORT_ERROR}")
        return Launch(_C_cuda, device.index, torch.cuda.current_stream(device).cuda_stream, True)
    raise ValueError(f"genkernels runs on cpu and cuda tensors, got a tensor on {device}")


@functools.lru_cache(maxsize=None)
def _cpu_launch(threads: int) -> Launch:
    """The CPU's launch for ``threads`` threads, built once: a frozen dataclass costs half a
    microsecond to build, at every kernel call."""
    return Launch(_C, threads, 0, False)


def float_dtypes(device: torch.device, cpu_extra: tuple[torch.dtype, ...] = ()) -> tuple[torch.dtype, ...]:
    """The floating dtypes the kernels accept on `device`; `cpu_extra` names the 16-bit types an
    op's CPU kernels also take."""
    if device.type == "cuda" or (device.type == "cpu" and _emulating):
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    return (torch.float32, torch.float64, *cpu_extra)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute in float64 for float64 storage and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class CustomOp:
    """A ``torch.library`` custom op that eager calls needing nothing of the dispatcher run
    directly.

    Passing through ``torch.ops.genkernels.<name>`` costs tens of microseconds of Python in the
    dispatcher (about 55 us on this project's CPU), more than a decoding step's attention kernel
    takes. A call runs the implementation itself when no graph is being traced, no dispatch or
    function mode, functorch transform or profiler is active and every tensor is a plain CPU or
    CUDA tensor; when an input needs a gradient it runs under an ``autograd.Function`` made of the
    op's registered backward, which is what the registered op's autograd does below the
    dispatcher. Any other call goes through the registered op, so ``torch.compile``,
    ``torch.jit.trace``, fake tensors and ``TorchDispatchMode`` see ``torch.ops.genkernels``.
    """

    def __init__(self, op: Any, impl: Callable[..., Any], mutates_args: tuple[str, ...] = ()) -> None:
        self.op = op  # the torch.library CustomOpDef
        self.impl = impl
        names = list(inspect.signature(impl).parameters)
        self._mutated = tuple(names.index(name) for name in mutates_args)  # positions of the mutated arguments
        self._function: Optional[type[torch.autograd.Function]] = None  # set by register_autograd

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        path = _eager_path((*args, *kwargs.values()))
        if path == _DIRECT and not (self._mutated and kwargs):
            result = self.impl(*args, **kwargs)
            if self._mutated:  # what the dispatcher does for a mutating op, so that autograd sees the writes
                torch.autograd.graph.increment_version([args[i] for i in self._mutated])
            return result
        if path == _DIRECT_WITH_GRAD and self._function is not None and not kwargs and not self._mutated:
            return self._function.apply(*args)
        return self.op(*args, **kwargs)

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable[..., Any], *, setup_context: Callable[..., Any]) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx: Any, *args: Any) -> Any:
            output = impl(*args)
            setup_context(ctx=ctx, inputs=args, output=output)
            return output

        name = f"Eager{impl.__name__}"
        self._function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def custom_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], CustomOp]:
    """``torch.library.custom_op`` returning a `CustomOp`."""
    def wrap(impl: Callable[..., Any]) -> CustomOp:
        return CustomOp(torch.library.custom_op(name, mutates_args=mutates_args)(impl), impl, mutates_args)
    return wrap


# How an eager call runs: the implementation itself, the implementation under autograd, or the op.
_DIRECT, _DIRECT_WITH_GRAD, _DISPATCH = range(3)


def _eager_path(args: Iterable[Any]) -> int:
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch.autograd.profiler._is_profiler_enabled
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._get_tracing_state() is not None  # torch.jit.trace records only dispatched ops
    ):
        return _DISPATCH
    grad = torch.is_grad_enabled()
    path = _DIRECT
    for a in args:
        if isinstance(a, Tensor):
            if type(a) is not Tensor or a.is_meta:
                return _DISPATCH
            if grad and a.requires_grad:
                path = _DIRECT_WITH_GRAD
    return path

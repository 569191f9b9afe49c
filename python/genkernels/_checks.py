"""Argument checks for the public ops: each failure names the function, the argument, what was
expected and what came, and is raised before any kernel runs."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterable, Optional, Sequence

import torch

from ._backend import float_dtypes


def _fail(kind: type, fn: str, name: str, expected: str, got: object) -> Exception:
    return kind(f"{fn}(): argument '{name}' must be {expected}, got {got}")


def tensor(fn: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _fail(TypeError, fn, name, "a torch.Tensor", type(value).__name__)
    if not (value.is_cpu or value.is_cuda):  # device.type would build a device and a string
        raise _fail(ValueError, fn, name, "on a cpu or cuda device", value.device)
    return value


_EVERYWHERE = (torch.float32, torch.float64)


def float_tensor(
    fn: str, name: str, value: object, *, min_dim: int = 0, cpu_extra: tuple[torch.dtype, ...] = ()
) -> torch.Tensor:
    t = tensor(fn, name, value)
    # float32 and float64 run everywhere, and every device takes an op's CPU extras.
    if t.dtype not in _EVERYWHERE and t.dtype not in cpu_extra and t.dtype not in (allowed := float_dtypes(t.device, cpu_extra)):
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise _fail(TypeError, fn, name, f"a tensor of dtype {names} on {t.device.type}", t.dtype)
    if t.dim() < min_dim:
        raise _fail(ValueError, fn, name, f"a tensor of at least {min_dim} dimensions", f"shape {tuple(t.shape)}")
    return t


def same_device(fn: str, tensors: dict[str, torch.Tensor]) -> None:
    first, t0 = next(iter(tensors.items()))
    device = t0.device
    for n, t in tensors.items():
        if t.device != device:
            raise _fail(ValueError, fn, n, f"on the same device as '{first}' ({device})", t.device)


def same_dtype(fn: str, tensors: dict[str, torch.Tensor]) -> None:
    first, t0 = next(iter(tensors.items()))
    dtype = t0.dtype
    for n, t in tensors.items():
        if t.dtype != dtype:
            raise _fail(TypeError, fn, n, f"of the same dtype as '{first}' ({dtype})", t.dtype)


def broadcast_shapes(fn: str, tensors: dict[str, torch.Tensor]) -> torch.Size:
    shapes = [t.shape for t in tensors.values()]
    if all(s == shapes[0] for s in shapes):  # the common case, without torch's slow general path
        return shapes[0]
    try:
        return torch.broadcast_shapes(*(t.shape for t in tensors.values()))
    except RuntimeError:
        shapes = ", ".join(f"'{n}' {tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"{fn}(): arguments must have broadcastable shapes, got {shapes}") from None


def integer(fn: str, name: str, value: object, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _fail(TypeError, fn, name, "an int", type(value).__name__)
    if minimum is not None and value < minimum:
        raise _fail(ValueError, fn, name, f"an int >= {minimum}", value)
    return int(value)


def real(fn: str, name: str, value: object, *, positive: bool = False) -> float:
    # A float needs no isinstance against the Real ABC, which is slow.
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, Real)):
        raise _fail(TypeError, fn, name, "a real number", type(value).__name__)
    v = float(value)
    if not math.isfinite(v):
        raise _fail(ValueError, fn, name, "finite", v)
    if positive and v <= 0:
        raise _fail(ValueError, fn, name, "positive", v)
    return v


def choice(fn: str, name: str, value: object, options: Sequence[str]) -> str:
    if value not in options:
        raise _fail(ValueError, fn, name, "one of " + ", ".join(repr(o) for o in options), repr(value))
    return value  # type: ignore[return-value]


def dtype(fn: str, name: str, value: object, options: Iterable[torch.dtype]) -> torch.dtype:
    options = tuple(options)
    if not isinstance(value, torch.dtype) or value not in options:
        names = ", ".join(str(d) for d in options)
        raise _fail(TypeError, fn, name, f"one of {names}", value)
    return value


def generator(fn: str, value: object) -> Optional[torch.Generator]:
    if value is not None and not isinstance(value, torch.Generator):
        raise _fail(TypeError, fn, "generator", "a torch.Generator or None", type(value).__name__)
    return value

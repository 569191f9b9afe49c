"""Shared fixtures: every op test runs on each backend that can run here.

``device`` is "cpu" (the C++ CPU kernels), "emulated" (the CUDA kernels run on CPU threads by the
emulation of CUDA; CPU tensors inside ``genkernels.emulated_cuda()``) and "cuda" (a real GPU).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

import genkernels
from genkernels import _backend

BACKENDS = ["cpu"]
if _backend._C_emu is not None:
    BACKENDS.append("emulated")
if _backend._C_cuda is not None and torch.cuda.is_available():
    BACKENDS.append("cuda")


class Backend:
    """A place to run ops: the torch device of its tensors and the context that selects it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        self.cuda_kernels = name in ("cuda", "emulated")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with genkernels.emulated_cuda() if self.name == "emulated" else contextlib.nullcontext():
            yield

    def float_dtypes(self) -> list[torch.dtype]:
        extra = [torch.float16, torch.bfloat16] if self.cuda_kernels else []
        return [torch.float32, torch.float64, *extra]

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=BACKENDS)
def backend(request) -> Iterator[Backend]:
    b = Backend(request.param)
    with b.active():
        yield b


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """Every test draws fresh random inputs; the seed is printed, so a failure can be replayed
    with GENKERNELS_TEST_SEED."""
    import os
    import random

    seed = int(os.environ.get("GENKERNELS_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    print(f"GENKERNELS_TEST_SEED={seed}")
    return seed

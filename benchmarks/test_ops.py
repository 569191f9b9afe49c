"""Every case of `genkernels.bench.CASES` under pytest-benchmark: the genkernels op and its
PyTorch reference, benchmarked side by side in a group named after the case.

    python -m pytest benchmarks --benchmark-only                 # time them
    python -m pytest benchmarks --benchmark-disable              # run each once, as plain tests

The cases, sizes and references are those of ``python -m genkernels bench``; this file only
adapts them to pytest-benchmark (which has no compiled variant, ceilings or bandwidth columns:
the bytes each case moves are stored in the benchmark's ``extra_info``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from genkernels.bench import CASES, Case, bind

IMPLEMENTATIONS = ("genkernels", "reference")


_last_inputs: dict[tuple[str, str, str], tuple[Any, ...]] = {}


def _inputs(case: Case, device: torch.device, scale: str) -> tuple[Any, ...]:
    """The inputs of a case, kept (for one case at a time) while its implementations run one
    after the other."""
    key = (case.name, str(device), scale)
    if key not in _last_inputs:
        _last_inputs.clear()
        _last_inputs[key] = case.inputs(device, **case.size(scale))
    return _last_inputs[key]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_op(benchmark, case: Case, implementation: str, bench_device: torch.device, bench_scale: str) -> None:
    if bench_device.type not in case.devices:
        pytest.skip(f"{case.name} does not run on {bench_device.type}")
    size = case.size(bench_scale)
    call = bind(getattr(case, implementation), _inputs(case, bench_device, bench_scale), bench_device)
    benchmark.group = case.name
    benchmark.extra_info.update(shape=case.shape.format(**size), bytes=case.bytes_moved(**size))
    if not benchmark.disabled:
        call()  # warm-up: first-call allocations and lazy initialisation stay out of the timing
    out = benchmark(call)
    assert out is not None

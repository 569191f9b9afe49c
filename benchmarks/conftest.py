"""Options of the pytest-benchmark suite (``python -m pytest benchmarks --benchmark-only``).

``--bench-device cpu|cuda`` picks the device (default: cuda if available, else cpu) and
``--bench-quick`` uses the small sizes of ``python -m genkernels bench --quick``.
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("genkernels benchmarks")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device of the genkernels benchmarks (default: cuda if available, else cpu)")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="run the genkernels benchmarks at their --quick sizes")


@pytest.fixture(scope="session")
def bench_device(request: pytest.FixtureRequest) -> torch.device:
    """The device the benchmarks run on; skips them when CUDA is asked for but unavailable."""
    name = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but CUDA is not available to torch")
    return torch.device(name)


@pytest.fixture(scope="session")
def bench_scale(request: pytest.FixtureRequest) -> str:
    """The size of the inputs: "quick" with --bench-quick, else "full"."""
    return "quick" if request.config.getoption("--bench-quick") else "full"

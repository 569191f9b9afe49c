"""The emulated-backend tests again with the threads of each block run in reverse and in random
order, which exposes missing barriers that the default forward order hides. Each order runs in a
fresh process because the emulator reads GK_EMU_ORDER once, at its first launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genkernels import _backend

ROOT = Path(__file__).resolve().parent.parent
SUITES = ["tests/test_positional.py", "tests/test_sampling.py", "tests/test_attention.py",
          "tests/test_attention_backward.py", "tests/test_attention_dropout.py"]


@pytest.mark.skipif(_backend._C_emu is None, reason="needs the emulated CUDA module (GENKERNELS_EMULATION=ON)")
@pytest.mark.skipif("GK_EMU_ORDER" in os.environ, reason="GK_EMU_ORDER is set: this run already chose an order")
@pytest.mark.parametrize("order", ["reverse", "random:12345"])
def test_emulated_tests_pass_in_order(order: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *SUITES, "-k", "emulated", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=dict(os.environ, GK_EMU_ORDER=order), capture_output=True, text=True,
    )
    assert result.returncode == 0, f"GK_EMU_ORDER={order}:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"

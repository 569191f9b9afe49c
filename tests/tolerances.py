"""Tolerances shared by the op tests."""

from __future__ import annotations

import torch


def low_precision_tol(dtype: torch.dtype) -> float:
    """Absolute tolerance for values of magnitude ~1 stored in dtype: two units in the last place."""
    return {torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}.get(dtype, 0.0)

"""Seeds for the counter-based (Philox4x32-10) noise drawn inside the kernels."""

from __future__ import annotations

from typing import Optional

import torch

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Two int64 values (Philox key and stream offset) from `generator`, on `device`.

    With no generator the device's default generator is used, so ``torch.manual_seed`` makes
    runs reproducible. The seed stays on the device: a CUDA kernel reads it from memory, so
    drawing noise never synchronises with the host.
    """
    if generator is None:
        return torch.randint(_INT64_MIN, _INT64_MAX, (2,), dtype=torch.int64, device=device)
    seed = torch.randint(_INT64_MIN, _INT64_MAX, (2,), dtype=torch.int64, device=generator.device, generator=generator)
    return seed.to(device)

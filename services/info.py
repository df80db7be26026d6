"""What a service says about its model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a rule-only reward service starts without torch
    import torch


@dataclass(frozen=True)
class ServiceInfo:
    """Model size, placement and precision of a service, and the process hosting it."""

    parameters: int
    device: str
    dtype: str
    pid: int
    threads: int = 1
    """Intra-op threads of its process (the thread budget, rlfleet.common.threads)."""


def model_info(model: torch.nn.Module) -> ServiceInfo:
    import torch

    first = next(model.parameters())
    return ServiceInfo(
        parameters=sum(p.numel() for p in model.parameters()),
        device=str(first.device),
        dtype=str(first.dtype).removeprefix("torch."),
        pid=os.getpid(),
        threads=torch.get_num_threads(),
    )

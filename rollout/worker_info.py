"""What a rollout worker says about itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class WorkerInfo:
    """Identity and state of one rollout worker."""

    worker_id: str
    """Unique per constructor run: a restarted actor gets a new id."""
    backend: Literal["vllm", "hf"]
    """Generation engine."""
    pid: int
    """Process id of the actor (for diagnostics and fault-injection tests)."""
    policy_version: int
    """Version of the weights it holds (0 = the initial weights)."""
    threads: int = 1
    """Intra-op threads it generates with (its thread budget, rlfleet.common.threads)."""

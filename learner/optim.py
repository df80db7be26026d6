"""The learner's optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from rlfleet.common.config import LearnerConfig


def adamw_with_schedule(params, lr: float, lc: LearnerConfig, total_steps: int):
    """AdamW and its LambdaLR: linear warmup over `lc.warmup_steps`, then constant or cosine
    down to 0 at `total_steps` optimizer steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=lc.weight_decay)

    def factor(step: int) -> float:
        if step < lc.warmup_steps:
            return (step + 1) / (lc.warmup_steps + 1)
        if lc.schedule == "constant":
            return 1.0
        progress = min((step - lc.warmup_steps) / max(total_steps - lc.warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scheduler_state(scheduler) -> dict | None:
    """A LambdaLR's state without its (unpicklable, rebuilt on load) lambdas: JSON-ready."""
    if scheduler is None:
        return None
    state = dict(scheduler.state_dict())
    state["lr_lambdas"] = [None] * len(state.get("lr_lambdas", []))
    return state


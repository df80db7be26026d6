"""The learner's optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

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



class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def guarded_step(model: torch.nn.Module, optimizer, scheduler, finite_loss: bool, max_norm: float, limit: int,
                 in_a_row: dict[int, int]) -> float:
    """Clip the gradient norm to `max_norm` and step; the norm, or NaN when a non-finite norm
    (or `finite_loss` False) skipped the step. `in_a_row` counts skips per optimizer; at
    `limit` in a row NonFiniteError stops the run before the weights are published or saved."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    if not (finite_loss and torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        in_a_row[id(optimizer)] = run = in_a_row.get(id(optimizer), 0) + 1
        if run >= limit:
            raise NonFiniteError(
                f"{run} optimizer steps in a row had a non-finite loss or gradient "
                f"(learner.max_skips_in_a_row={limit}); stopping before the weights are published or saved"
            )
        return float("nan")
    in_a_row[id(optimizer)] = 0
    optimizer.step()
    scheduler.step()
    return norm.item()

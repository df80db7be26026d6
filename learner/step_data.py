"""The data of one learner step: which responses go together in a forward pass, the per-token
tensors a minibatch slices, and when the update can make its own old log-probs.

Notation: B responses, T longest response in the step; P prompt length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rlfleet.common.config import RunConfig
from rlfleet.common.records import Rollout


def reuses_update_logprobs(cfg: RunConfig) -> bool:
    """True when a step makes one update on its whole batch and needs nothing from the old
    log-probs before it: one epoch, one minibatch, no critic (values), no KL in the token
    rewards, no colocated reference (computed with them), no truncated IS. The update's own
    log-probs, detached, are then the old ones, and the driver skips `prepare`."""
    a, lc = cfg.algorithm, cfg.learner
    batch = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    colocated = cfg.reference.enabled and cfg.reference.colocate_with_learner and a.kl_in != "none"
    return (lc.ppo_epochs == 1 and lc.minibatch_size >= batch and a.advantage_estimator != "gae"
            and a.kl_in != "reward" and not colocated and a.tis_cap is None)


@dataclass(frozen=True)
class StepTensors:
    """The step's per-token tensors [B, T] (on the learner's device)."""

    mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    is_weights: torch.Tensor | None

    def rows(self, idx: Sequence[int], width: int) -> StepTensors:
        """Rows `idx`, the first `width` columns (responses are right-padded)."""
        index = torch.tensor(list(idx), device=self.mask.device)
        pick = {k: None if v is None else v[index, :width] for k, v in vars(self).items()}
        return StepTensors(**pick)


def token_budget_batches(lengths: Sequence[tuple[int, int]], idx: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Cut `idx` (in order) into micro-batches whose padded size rows × (P + T) fits `budget`
    (a single longer sequence still gets its own micro-batch)."""
    current: list[int] = []
    width_p = width_r = 0
    for i in idx:
        p, r = lengths[i]
        wp, wr = max(width_p, p), max(width_r, r)
        if current and (len(current) + 1) * (wp + wr) > budget:
            yield current
            current, wp, wr = [], p, r
        current.append(i)
        width_p, width_r = wp, wr
    if current:
        yield current


def scatter_rows(out: list[list[float]], idx: Sequence[int], rows: torch.Tensor, rollouts: Sequence[Rollout]) -> None:
    """Write each row of `rows` (its response's length of it) into `out` at index `idx[j]`."""
    if not idx:
        return
    for row, i in zip(rows.float().cpu(), idx, strict=True):
        out[i] = row[: len(rollouts[i].response_ids)].tolist()

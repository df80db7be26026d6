"""Per-step metrics of the learner under TRL's names (FORMULAS.md, "Metric names").

Notation: B responses, T response length. The batch-level numbers are computed once per
step from the rollout data; the update numbers are accumulated over every micro-batch of every
minibatch and epoch, weighted by their token counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from rlfleet.common.records import Rollout
from rlfleet.learner.algos import masked_mean, masked_sum


def batch_metrics(
    rollouts: Sequence[Rollout],
    scores_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    mask_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    rollout_logprobs_BT: torch.Tensor,
    kl_BT: torch.Tensor,
    reward_kl_coef: float,
) -> dict[str, float]:
    """Objective, reward and completion statistics of one step's batch."""
    n = len(rollouts)
    seq_kl = masked_sum(kl_BT, mask_BT, dim=-1)
    non_score = -reward_kl_coef * seq_kl
    group_std = [scores_B[group_ids_B == g].std().item() for g in group_ids_B.unique()]
    return {
        "objective/kl": seq_kl.mean().item(),
        "objective/entropy": masked_sum(-old_logprobs_BT, mask_BT, dim=-1).mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (scores_B + non_score).mean().item(),
        "objective/scores": scores_B.mean().item(),
        "reward": scores_B.mean().item(),
        "reward_std": scores_B.std().item() if n > 1 else 0.0,
        "frac_reward_zero_std": sum(1 for s in group_std if not s > 0) / len(group_std),
        "completions/mean_length": mask_BT.sum(-1).mean().item(),
        "completions/clipped_ratio": sum(r.finish_reason == "length" for r in rollouts) / n,
        "val/num_eos_tokens": float(sum(r.finish_reason == "stop" for r in rollouts)),
        "rollout/logprob_diff": masked_mean((old_logprobs_BT - rollout_logprobs_BT).abs(), mask_BT).item(),
    }


class UpdateMetrics:
    """Accumulates the policy/value update numbers over micro-batches."""

    def __init__(self) -> None:
        self._token_weighted: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._per_minibatch: dict[str, list[float]] = defaultdict(list)
        self._ratios: list[torch.Tensor] = []

    def add_micro(self, tokens: float, values: dict[str, torch.Tensor | float]) -> None:
        """Token-mean statistics of one micro-batch with `tokens` response tokens."""
        for name, value in values.items():
            self._token_weighted[name].append((float(value), tokens))

    def add_ratios(self, ratio_BT: torch.Tensor, mask_BT: torch.Tensor) -> None:
        self._ratios.append(ratio_BT.detach()[mask_BT.bool()].float().cpu())

    def add_minibatch(self, name: str, value: float) -> None:
        self._per_minibatch[name].append(value)

    @classmethod
    def merged(cls, ranks: list[UpdateMetrics]) -> UpdateMetrics:
        """One rank's view of the whole update: token-weighted numbers pooled over the ranks,
        the per-minibatch losses summed (each rank's is its share of the global normaliser),
        the rest (e.g. the gradient norm, equal on every rank after the all-reduce) from rank 0."""
        if len(ranks) == 1:
            return ranks[0]
        out = cls()
        for part in ranks:
            for name, pairs in part._token_weighted.items():
                out._token_weighted[name].extend(pairs)
            out._ratios.extend(part._ratios)
        for name, values in ranks[0]._per_minibatch.items():
            if name.startswith("loss/"):
                values = [sum(col) for col in zip(*(p._per_minibatch[name] for p in ranks), strict=True)]
            out._per_minibatch[name] = list(values)
        return out

    def result(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, pairs in self._token_weighted.items():
            total = sum(w for _, w in pairs)
            out[name] = sum(v * w for v, w in pairs) / total if total else 0.0
        for name, values in self._per_minibatch.items():
            out[name] = sum(values) / len(values)
        ratios = torch.cat(self._ratios) if self._ratios else torch.zeros(1)
        out["val/ratio"] = ratios.mean().item()
        out["val/ratio_var"] = ratios.var().item() if ratios.numel() > 1 else 0.0
        return out

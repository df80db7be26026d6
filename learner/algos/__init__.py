"""Pure RL math: tensors and floats in, tensors out. Imports only torch and rlfleet.common.

Conventions are fixed by shared/reference/FORMULAS.md. Notation in every module: B responses,
T response length, G responses per prompt, V vocabulary; `mask[b, t] = 1` exactly where the
policy sampled the token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlfleet.learner.algos.advantages import (
    discounted_returns,
    gae,
    grpo_advantages,
    last_token_index,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rlfleet.learner.algos.kl import AdaptiveKLController, FixedKLController, kl_penalty
from rlfleet.learner.algos.losses import (
    dpo_loss,
    entropy_from_logits,
    logprobs_from_logits,
    ppo_policy_loss,
    reward_model_loss,
    truncated_is_weights,
    value_loss,
)
from rlfleet.learner.algos.masked import (
    agg_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)


class UnknownNameError(KeyError):
    """A registry lookup of a name that is not there; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(dict):
    """A plain dict of named alternatives whose missing key names the valid ones."""

    def __init__(self, kind: str, entries: dict):
        super().__init__(entries)
        self.kind = kind

    def __missing__(self, key: str):
        raise UnknownNameError(f"unknown {self.kind} {key!r}; valid names: {', '.join(sorted(self))}")


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read. Tensors [B, T] unless noted."""

    token_rewards: torch.Tensor
    """Score at the last response token minus β·KL per token (see `token_level_rewards`)."""
    scores: torch.Tensor
    """Sequence scores [B]."""
    group_ids: torch.Tensor
    """Prompt group of each response [B]."""
    mask: torch.Tensor
    """Response mask."""
    values: torch.Tensor | None = None
    """Critic values (GAE only)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""


def _gae(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if x.values is None:
        raise ValueError("the 'gae' estimator needs critic values")
    advantages, returns = gae(x.token_rewards, x.values, x.mask, x.gamma, x.lam)
    return masked_whiten(advantages, x.mask), returns


def _group(norm_by_std: bool) -> Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]:
    def estimate(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
        advantages = grpo_advantages(x.scores, x.group_ids, x.mask, norm_by_std=norm_by_std)
        return advantages, advantages

    return estimate


def _rloo(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    advantages = rloo_advantages(x.scores, x.group_ids, x.mask)
    return advantages, advantages


# name → estimator(AdvantageInputs) → (advantages [B, T], returns [B, T]); advantages are
# ready for the policy loss (GAE's are whitened here, `gae` itself returns them raw).
ADVANTAGE_ESTIMATORS = Registry(
    "advantage estimator",
    {
        "gae": _gae,
        "grpo": _group(norm_by_std=True),
        "dr_grpo": _group(norm_by_std=False),
        "rloo": _rloo,
        "reinforce_pp": lambda x: reinforce_pp_advantages(x.token_rewards, x.mask, x.gamma),
        "reinforce_pp_baseline": lambda x: reinforce_pp_baseline_advantages(
            x.token_rewards, x.scores, x.group_ids, x.mask, x.gamma
        ),
    },
)

POLICY_LOSSES = Registry("policy loss", {"ppo": ppo_policy_loss})

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "AdvantageInputs",
    "FixedKLController",
    "Registry",
    "UnknownNameError",
    "agg_loss",
    "discounted_returns",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "reward_model_loss",
    "rloo_advantages",
    "token_level_rewards",
    "truncated_is_weights",
    "value_loss",
]

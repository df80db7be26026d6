"""The advantage-estimator registry (`ADVANTAGE_ESTIMATORS`), each estimator's capabilities
beside it, and `AdvantageInputs`, everything an estimator may read.

Notation: B responses, T response length, K reward components. An estimator maps
`AdvantageInputs` to (advantages [B, T], returns [B, T]); the advantages are ready for the
policy loss (GAE's are whitened here; `gae` itself returns them raw), 0 at masked positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlfleet.common.registry import ADVANTAGE_ESTIMATORS
from rlfleet.learner.algos import group_estimators as ge
from rlfleet.learner.algos.advantages import (
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from rlfleet.learner.algos.masked import masked_whiten


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
    """Critic values (gae)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    baselines: torch.Tensor | None = None
    """[B] the reward of each prompt's greedy response (remax)."""
    old_logprobs: torch.Tensor | None = None
    """Log-probs of the sampled tokens under the policy that is trained (optimal token baselines)."""
    sum_pi_squared: torch.Tensor | None = None
    """Σ_v π_v² per token, the policy's collision probability (optimal token baselines)."""
    is_weights: torch.Tensor | None = None
    """Rollout-correction IS weights ρ (optimal token baselines scale W by ρ²)."""
    reward_components: torch.Tensor | None = None
    """[B, K] each reward source's value (gdpo; None: the scores alone)."""
    component_weights: torch.Tensor | None = None
    """[K] weights of the components (gdpo; None: all 1)."""
    eps: float | None = None
    """Stabiliser of a division; None: the estimator's own default (1e-6 for the group
    normalisers, 1e-8 for the optimal token baselines)."""
    scale_by_std: bool = True
    """Divide by the group's std (grpo, grpo_passk, gdpo); false gives Dr.GRPO's centring."""
    f_norm: float = 1.0
    """GPG's normaliser."""
    zero_tail: bool = True
    """Optimal token baselines: the longest response, alone past the second longest, gets
    baseline 0 there."""


@dataclass(frozen=True)
class EstimatorInfo:
    """What the learner and the config check need to know of an estimator."""

    needs_critic: bool = False
    """It reads critic values (the learner then trains a critic)."""
    group_relative: bool = False
    """It compares the responses of one prompt: samples_per_prompt must be ≥ 2."""
    needs_old_logprobs: bool = False
    """It reads the old log-probs and Σπ² (computed before the update)."""
    needs_baselines: bool = False
    """It reads a greedy response's reward per prompt (generated beside the batch)."""


def register(name: str, info: EstimatorInfo = EstimatorInfo()) -> Callable[[Callable], Callable]:
    """Register an estimator, `fn(AdvantageInputs) -> (advantages, returns)`, under `name`, its
    capabilities as `fn.info` (a decorator; also how one from outside the package is added)."""
    return ADVANTAGE_ESTIMATORS.register(name, info)


def _eps(x: AdvantageInputs, default: float) -> float:
    return default if x.eps is None else x.eps


def _need(x: AdvantageInputs, name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(x, f) is None]
    if missing:
        raise ValueError(f"the {name!r} estimator needs {', '.join(missing)}")


GROUP = EstimatorInfo(group_relative=True)


@register("gae", EstimatorInfo(needs_critic=True))
def _gae(x: AdvantageInputs):
    if x.values is None:
        raise ValueError("the 'gae' estimator needs critic values")
    advantages, returns = gae(x.token_rewards, x.values, x.mask, x.gamma, x.lam)
    return masked_whiten(advantages, x.mask), returns


@register("grpo", GROUP)
def _grpo(x: AdvantageInputs):
    advantages = grpo_advantages(x.scores, x.group_ids, x.mask, norm_by_std=x.scale_by_std, eps=_eps(x, 1e-6))
    return advantages, advantages


@register("dr_grpo", GROUP)
def _dr_grpo(x: AdvantageInputs):
    advantages = grpo_advantages(x.scores, x.group_ids, x.mask, norm_by_std=False)
    return advantages, advantages


@register("rloo", GROUP)
def _rloo(x: AdvantageInputs):
    advantages = rloo_advantages(x.scores, x.group_ids, x.mask)
    return advantages, advantages


@register("reinforce_pp")
def _reinforce_pp(x: AdvantageInputs):
    return reinforce_pp_advantages(x.token_rewards, x.mask, x.gamma)


@register("reinforce_pp_baseline", GROUP)
def _reinforce_pp_baseline(x: AdvantageInputs):
    return reinforce_pp_baseline_advantages(x.token_rewards, x.scores, x.group_ids, x.mask, x.gamma)


@register("grpo_passk", GROUP)
def _grpo_passk(x: AdvantageInputs):
    advantages = ge.grpo_passk_advantages(x.scores, x.group_ids, x.mask, x.scale_by_std, _eps(x, 1e-6))
    return advantages, advantages


@register("opo", GROUP)
def _opo(x: AdvantageInputs):
    advantages = ge.opo_advantages(x.scores, x.group_ids, x.mask)
    return advantages, advantages


@register("gpg", GROUP)
def _gpg(x: AdvantageInputs):
    advantages = ge.gpg_advantages(x.scores, x.group_ids, x.mask, x.f_norm)
    return advantages, advantages


@register("gdpo", GROUP)
def _gdpo(x: AdvantageInputs):
    advantages = ge.gdpo_advantages(x.scores, x.group_ids, x.mask, x.reward_components, x.component_weights,
                                    x.scale_by_std, _eps(x, 1e-6))
    return advantages, advantages


@register("remax", EstimatorInfo(needs_baselines=True))
def _remax(x: AdvantageInputs):
    _need(x, "remax", "baselines")
    return ge.remax_advantages(x.token_rewards, x.baselines, x.mask)


_OTB = EstimatorInfo(group_relative=True, needs_old_logprobs=True)


@register("optimal_token_baseline", _OTB)
def _optimal_token_baseline(x: AdvantageInputs):
    _need(x, "optimal_token_baseline", "old_logprobs", "sum_pi_squared")
    return ge.optimal_token_baseline_advantages(x.token_rewards, x.group_ids, x.mask, x.old_logprobs,
                                                x.sum_pi_squared, x.is_weights, x.zero_tail, _eps(x, 1e-8))


@register("tir_optimal_token_baseline", _OTB)
def _tir_optimal_token_baseline(x: AdvantageInputs):
    _need(x, "tir_optimal_token_baseline", "old_logprobs", "sum_pi_squared")
    return ge.tir_optimal_token_baseline_advantages(x.token_rewards, x.group_ids, x.mask, x.old_logprobs,
                                                    x.sum_pi_squared, x.is_weights, x.zero_tail, _eps(x, 1e-8))

"""Token-level rewards and advantage estimators (docs/algorithms/advantage-estimators.md).

Notation: B responses, T response length, G responses per prompt (a group); `mask[b, t] = 1`
exactly where the policy sampled the token; L_b is the last index of row b with mask 1.

- Token rewards: r = −β·kl·m, then the sequence score is added at L_b (the EOS token if it
  was generated, else the truncation point), never at a padding position.
- GAE: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (2016). Masked positions are skipped, not treated as steps: the next value and
  the running advantage are carried across them (so interleaved tool/observation tokens do
  not count), and nothing bootstraps past L_b.
- GRPO: Shao et al., "DeepSeekMath" (2024): (s − mean_g) / (std_g + ε), std unbiased.
  Dr.GRPO: Liu et al., "Understanding R1-Zero-Like Training" (2025): s − mean_g.
- RLOO: Ahmadian et al., "Back to Basics" (2024): s minus the mean of the other G − 1 scores.
- REINFORCE++: Hu, "REINFORCE++" (2025): discounted return-to-go of the token rewards,
  whitened over the batch; the -baseline variant first subtracts the group mean score.

Singletons: a group of one response has no baseline, so its baseline is 0 and its spread 1
(its advantage is its own score; verl's convention, the same for every group estimator).
Outputs at masked positions are 0.
"""

from __future__ import annotations

import torch

from rlfleet.learner.algos.group_estimators import broadcast, group_moments
from rlfleet.learner.algos.masked import masked_whiten, zero_masked


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """L_b [B]: the last index with mask 1 (0 for an all-zero row)."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.bool() * positions).argmax(dim=-1)



def token_level_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """r [B, T] = −β·kl·m with scores [B] added at each row's last response token.

    A row with no response token (all-zero mask) gets no reward at all.
    """
    rewards = zero_masked(-kl_coef * kl, mask)
    has_token = mask.bool().any(dim=-1)
    placed = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(-1, last_token_index(mask)[:, None], placed[:, None])


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unwhitened) GAE advantages [B, T] and returns = advantages + values.

    Backwards over t with next value nv and last advantage lg starting at 0:
    δ_t = r_t + γ·nv − V_t; g = δ_t + γλ·lg; at unmasked t: nv ← V_t, lg ← g; A_t = lg.
    """
    keep = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    last_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[-1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * last_adv
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        last_adv = torch.where(keep[:, t], step, last_adv)
        advantages[:, t] = last_adv
    advantages = zero_masked(advantages, mask)
    return advantages, zero_masked(advantages + values, mask)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + γ·G_{t+1} over unmasked tokens (carried across masked ones); 0 where masked."""
    keep = mask.bool()
    running = torch.zeros_like(token_rewards[:, 0])
    returns = torch.zeros_like(token_rewards)
    for t in reversed(range(token_rewards.shape[-1])):
        running = torch.where(keep[:, t], token_rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return zero_masked(returns, mask)


def grpo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantages [B, T]: (s − mean_g)/(std_g + eps), or s − mean_g (Dr.GRPO) without std.

    scores [B], group_ids [B] (any integer labels, any order). Equal scores in a group give 0.
    """
    _, mean, std = group_moments(scores, group_ids)
    centred = scores - mean
    if norm_by_std:
        centred = centred / (std + eps)
    return broadcast(centred, mask)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO advantages [B, T]: s_b − (Σ_g s − s_b)/(G − 1); per group they sum to 0 (a singleton keeps s)."""
    size, mean, _ = group_moments(scores, group_ids)
    return broadcast(torch.where(size > 1, size / (size - 1).clamp(min=1) * (scores - mean), scores), mask)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: returns G [B, T] (return-to-go) and advantages masked_whiten(G)·m."""
    returns = discounted_returns(token_rewards, mask, gamma)
    return masked_whiten(returns, mask), returns


def reinforce_pp_baseline_advantages(
    token_rewards: torch.Tensor,
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: the group mean score is subtracted at L_b, then as REINFORCE++.

    `token_rewards` already holds each score at L_b (see `token_level_rewards`).
    """
    _, mean, _ = group_moments(scores, group_ids)
    shifted = token_level_rewards(-mean, torch.zeros_like(token_rewards), mask, 0.0)
    return reinforce_pp_advantages(token_rewards + shifted, mask, gamma)

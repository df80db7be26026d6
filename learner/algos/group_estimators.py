"""More outcome estimators: pass@k GRPO, OPO, GPG, ReMax, GDPO; the optimal token baseline.

Notation: B responses, T response length, K reward components; `mask[b, t] = 1` where the
policy sampled the token; L_b = Σ_t m[b, t]; s_b the sequence score; g(b) the group (prompt)
of response b and n_g its size. Every output is 0 at masked positions.

Singletons (one convention for every group-relative estimator, verl's): a group of one
response has no baseline: its baseline is 0 and its spread 1, so its advantage is its own
(scaled) score. `grpo_passk` alone refuses groups of one (it compares the best two).

- pass@k GRPO (verl `grpo_passk`, after Chen et al. 2025 "Pass@k Training"): only the best
  response of a group gets an advantage, its lead over the runner-up, (s_1 − s_2)/(σ_g + ε).
- OPO, Hao et al. 2025 ("On-Policy RL with Optimal reward baseline"): the length-weighted
  group mean Σ L_j s_j / Σ L_j as the baseline.
- GPG, Chu et al. 2025: α·(s − μ_g)/f_norm with α = B / #{b : s_b ≠ 0} over the whole batch
  (the gradient is rescaled to the responses that carry a signal).
- ReMax, Li et al. 2023: the reward-to-go minus the reward of the prompt's greedy response.
- GDPO (decoupled normalisation of several rewards): each reward component is normalised
  within its group first, the weighted sum is then whitened over the batch.
- Optimal token baseline (verl's OTB): a per-position baseline b_t = Σ_g G_t·W_t / Σ_g W_t,
  weighting each response's return-to-go G_t by its realised path variance
  W_t = Σ_{j ≤ t} (1 − 2π_j + Σ_v π_v²) (times ρ_j² under rollout IS); the `tir_` variant
  compacts each response's valid tokens first (multi-turn masks with holes).
"""

from __future__ import annotations

import torch

from rlfleet.learner.algos.masked import masked_whiten, zero_masked


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(dense group index [B] in 0..n_groups−1, n_groups)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, (int(inverse.max()) + 1 if inverse.numel() else 0)


def group_sum(x: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Σ over each response's group, per response [B] (x [B] or [B, T])."""
    totals = torch.zeros((n_groups, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    return totals[inverse]


def group_moments(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response [B]: its group's size, mean and unbiased std; a singleton's mean is 0 and std 1."""
    inverse, n = group_index(group_ids)
    size = group_sum(torch.ones_like(scores), inverse, n)
    mean = group_sum(scores, inverse, n) / size
    var = group_sum((scores - mean) ** 2, inverse, n) / (size - 1).clamp(min=1)
    single = size < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(var), var.sqrt())
    return size, mean, std


def broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A[b, t] = A_b · m[b, t]."""
    return zero_masked(per_seq[:, None].expand(mask.shape).to(per_seq.dtype), mask)


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = Σ_{t' ≥ t} m·r (undiscounted), 0 at masked positions."""
    kept = zero_masked(token_rewards, mask)
    return zero_masked(kept.flip(-1).cumsum(-1).flip(-1), mask)


def grpo_passk_advantages(scores, group_ids, mask, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[B, T]: the best response of each group gets (s_1 − s_2)[/(σ_g + eps)], the others 0."""
    size, _, std = group_moments(scores, group_ids)
    if bool((size < 2).any()):
        raise ValueError("the 'grpo_passk' estimator needs at least 2 responses per prompt")
    inverse, n = group_index(group_ids)
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(inverse[by_score], stable=True).indices]  # by group, best first
    starts = torch.zeros(n, dtype=torch.long, device=scores.device)
    starts[1:] = torch.bincount(inverse, minlength=n).cumsum(0)[:-1]
    best, second = order[starts], order[starts + 1]
    lead = scores[best] - scores[second]
    if norm_by_std:
        lead = lead / (std[best] + eps)
    per_seq = torch.zeros_like(scores).index_put_((best,), lead)
    return broadcast(per_seq, mask)


def opo_advantages(scores, group_ids, mask) -> torch.Tensor:
    """[B, T]: s − Σ_g L_j s_j / Σ_g L_j (0 baseline for a singleton)."""
    inverse, n = group_index(group_ids)
    lengths = mask.bool().sum(-1).to(scores.dtype)
    size = group_sum(torch.ones_like(scores), inverse, n)
    baseline = group_sum(lengths * scores, inverse, n) / group_sum(lengths, inverse, n).clamp(min=1e-12)
    return broadcast(scores - torch.where(size > 1, baseline, torch.zeros_like(baseline)), mask)


def gpg_advantages(scores, group_ids, mask, f_norm: float = 1.0) -> torch.Tensor:
    """[B, T]: α·(s − μ_g)/f_norm, α = B / max(#{b : s_b ≠ 0}, 1) over the batch."""
    _, mean, _ = group_moments(scores, group_ids)
    alpha = scores.numel() / max(int((scores != 0).sum()), 1)
    return broadcast(alpha * (scores - mean) / f_norm, mask)


def remax_advantages(token_rewards, baselines, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, G) [B, T]: A = G − b (b [B], the greedy response's reward), G the reward-to-go."""
    returns = returns_to_go(token_rewards, mask)
    return zero_masked(returns - baselines[:, None].to(returns.dtype), mask), returns


def gdpo_advantages(scores, group_ids, mask, components=None, weights=None, norm_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """[B, T]: whiten(Σ_k w_k·grpo(c_k)) (one component: whiten(grpo(s))); components [B, K], weights [K]."""
    def grpo(s):
        _, mean, std = group_moments(s, group_ids)
        return (s - mean) / (std + eps) if norm_by_std else s - mean

    if components is None:
        per_seq = grpo(scores)
    else:
        w = torch.ones(components.shape[1]) if weights is None else torch.as_tensor(weights)
        w = w.to(dtype=components.dtype, device=components.device)
        per_seq = sum(w[k] * grpo(components[:, k]) for k in range(components.shape[1]))
    return masked_whiten(broadcast(per_seq.to(scores.dtype), mask), mask)


def _path_weights(old_logprobs, sum_pi_squared, is_weights, mask) -> torch.Tensor:
    """W_t = Σ_{j ≤ t} m_j·(1 − 2π_j + Σπ²_j)(·ρ_j²) [B, T]."""
    w = 1.0 - 2.0 * torch.exp(zero_masked(old_logprobs, mask)) + zero_masked(sum_pi_squared, mask)
    if is_weights is not None:
        w = w * zero_masked(is_weights, mask) ** 2
    return zero_masked(w, mask).cumsum(-1)


def _group_baseline(returns, weights, valid, inverse, n, size, lengths, eps, zero_tail) -> torch.Tensor:
    """b [B, T] = Σ_g G·W·m / (Σ_g W·m + eps) per position; 0 for singletons; zero tail."""
    gw = torch.where(valid, returns * weights, torch.zeros_like(returns))
    w = torch.where(valid, weights, torch.zeros_like(weights))
    baseline = group_sum(gw, inverse, n) / (group_sum(w, inverse, n) + eps)
    baseline = torch.where((size > 1)[:, None], baseline, torch.zeros_like(baseline))
    if zero_tail:
        # The longest response of a group, when it is alone that long, has no company past
        # the second longest: there its baseline would be its own return. It gets 0 instead.
        order = torch.sort(lengths, descending=True, stable=True).indices
        ranked = order[torch.sort(inverse[order], stable=True).indices]
        starts = torch.zeros(n, dtype=torch.long, device=lengths.device)
        starts[1:] = torch.bincount(inverse, minlength=n).cumsum(0)[:-1]
        multi = torch.bincount(inverse, minlength=n) > 1
        longest, runner_up = ranked[starts[multi]], ranked[starts[multi] + 1]
        alone = lengths[longest] > lengths[runner_up]
        positions = torch.arange(baseline.shape[1], device=baseline.device)
        tail = (positions[None, :] >= lengths[runner_up][alone][:, None])
        rows = baseline[longest[alone]]
        baseline[longest[alone]] = torch.where(tail, torch.zeros_like(rows), rows)
    return baseline


def optimal_token_baseline_advantages(token_rewards, group_ids, mask, old_logprobs, sum_pi_squared,
                                      is_weights=None, zero_tail: bool = True, eps: float = 1e-8):
    """(A, G) [B, T]: A = (G − b)·m with the optimal per-position baseline b (absolute positions)."""
    returns = returns_to_go(token_rewards, mask)
    weights = _path_weights(old_logprobs, sum_pi_squared, is_weights, mask)
    inverse, n = group_index(group_ids)
    size = group_sum(torch.ones(mask.shape[0], device=mask.device), inverse, n)
    lengths = mask.bool().sum(-1)
    baseline = _group_baseline(returns, weights, mask.bool(), inverse, n, size, lengths, eps, zero_tail)
    return zero_masked(returns - baseline, mask), returns


def tir_optimal_token_baseline_advantages(token_rewards, group_ids, mask, old_logprobs, sum_pi_squared,
                                          is_weights=None, zero_tail: bool = True, eps: float = 1e-8):
    """(A, G) [B, T]: as the optimal token baseline, by each response's k-th generated token
    (valid tokens compacted to k = 0..L_b − 1); responses with no token are left out."""
    valid = mask.bool()
    returns = returns_to_go(token_rewards, mask)
    weights = _path_weights(old_logprobs, sum_pi_squared, is_weights, mask)
    lengths = valid.sum(-1)
    width = int(lengths.max()) if lengths.numel() else 0
    # compacted index of each valid token: k = (number of valid tokens before it)
    k = valid.long().cumsum(-1) - 1
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(k)
    compact_valid = torch.arange(width, device=mask.device)[None, :] < lengths[:, None]

    def compact(x):
        out = torch.zeros((mask.shape[0], width), dtype=x.dtype, device=x.device)
        out[rows[valid], k[valid]] = x[valid]
        return out

    present = lengths > 0
    group = torch.where(present, group_ids, torch.full_like(group_ids, -1))  # empties: out of every group
    inverse, n = group_index(group)
    size = group_sum(present.to(returns.dtype), inverse, n)
    size = torch.where(present, size, torch.ones_like(size))
    baseline = _group_baseline(compact(returns), compact(weights), compact_valid, inverse, n, size, lengths, eps,
                               zero_tail)
    advantages = torch.zeros_like(returns)
    advantages[valid] = (compact(returns) - baseline)[rows[valid], k[valid]]
    return advantages, returns

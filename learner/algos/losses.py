"""Value, reward-model and DPO losses, and log-prob / entropy helpers (policy losses: `policy_losses`).

Notation: B sequences, T response length, V vocabulary; `mask[b, t] = 1` where the policy
sampled the token. Inputs at masked positions are replaced by 0 before any arithmetic, so a
NaN or inf there changes neither the loss nor any gradient (the gradient there is exactly 0).

- Clipped value loss: as in the PPO2 baselines, ½·max((V − R)², (V_clip − R)²).
- Reward model: Bradley–Terry, −log σ(r_chosen − r_rejected) (Ouyang et al. 2022).
- DPO: Rafailov et al. (2023), sequence log-probs summed over response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlfleet.learner.algos.masked import AggMode, agg_loss, masked_mean, zero_masked

Metrics = dict[str, torch.Tensor]



def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    agg: AggMode = "token-mean",
    **agg_kwargs: int | float | torch.Tensor | None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss ½·agg(max((V − R)², (V_clip − R)²)), V_clip = V_old + clamp(V − V_old, ±clip)."""
    v = zero_masked(values, mask)
    v_old = zero_masked(old_values, mask)
    ret = zero_masked(returns, mask)
    # Inside the clip range V_clip is V itself (not V_old + (V − V_old), which rounds
    # differently), so "clipped" below counts only real clipping, not rounding noise.
    v_clipped = torch.where((v - v_old).abs() <= clip, v, v_old + (v - v_old).clamp(-clip, clip))
    err = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * agg_loss(torch.maximum(err, err_clipped), mask, agg, **agg_kwargs)
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask),
            "vpred": masked_mean(v, mask),
        }
    return loss, metrics


def logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] [B, T] from logits [B, T, V], without a [B, T, V] log-softmax copy.

    Computed as logit[token] − logsumexp(logits); half-precision logits are upcast to fp32
    one row at a time, so the transient fp32 copy is [T, V], not [B, T, V].
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        rows = [_row_logprobs(row.float(), ids) for row, ids in zip(logits, token_ids, strict=True)]
        return torch.stack(rows)
    return _row_logprobs(logits, token_ids)


def _row_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [B, T] of softmax(logits [B, T, V]): logsumexp(z) − Σ softmax(z)·z."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def reward_model_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Bradley–Terry loss mean(−log σ(r_chosen − r_rejected)) over pairs [B]; metrics: accuracy, margin."""
    margin = chosen_scores - rejected_scores
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        metrics = {"accuracy": (margin > 0).to(margin.dtype).mean(), "margin": margin.mean()}
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """DPO loss mean(−log σ(β·[(logπ_w − logπ_ref,w) − (logπ_l − logπ_ref,l)])) over pairs [B]."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen - rejected).mean()
    with torch.no_grad():
        metrics = {
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
            "accuracy": (chosen > rejected).to(chosen.dtype).mean(),
        }
    return loss, metrics

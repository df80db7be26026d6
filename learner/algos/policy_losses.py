"""Policy losses, one registry (`POLICY_LOSSES`) with each loss's capabilities beside it.

Notation: B sequences, T response length; `mask[b, t] = 1` where the policy sampled the token;
L_b = Σ_t m[b, t]; ℓθ the current log-probs (the only input with a gradient), ℓold the old
ones, δ = ℓθ − ℓold, r = exp(δ), A the advantages; sg(·) is stop-gradient. "Clamped" δ is
clamp(δ, −20, 20). Every loss is a quantity to minimise.

Every loss has one signature:

    loss_fn(logprobs, old_logprobs, advantages, mask, *, agg="token-mean", token_weights=None,
            num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size=1, **params)
      -> (loss, metrics)

`token_weights` [B, T] are constants (rollout-correction IS weights): they multiply the
per-token loss before aggregation (geo_mean: per sequence, as their geometric mean). The
normalisers go to `agg_loss`. Inputs at masked positions are replaced by 0 before any
arithmetic, so junk there changes no value and no gradient. Metrics (verl's names):
`pg_clipfrac`, `pg_clipfrac_lower`, `ppo_kl`, each where the loss defines it.

Sources: PPO, Schulman et al. 2017 (dual clip: Ye et al. 2020; clip-higher: DAPO, Yu et al.
2025); GSPO, Zheng et al. 2025 (sequence-level ratio); CISPO, MiniMax-M1 2025 (clipped IS
weight, gradient through ℓθ only); GPG, Chu et al. 2025; SAPO (soft gate σ(τ(r − 1))); DPPO
(trust region as a probability difference or binary KL); Clip-Cov / KL-Cov, Cui et al. 2025
("The Entropy Mechanism of RL for Reasoning LMs"); GMPO, Zhao et al. 2025 (geometric mean);
DRO (squared log-ratio penalty). Formulas and conventions follow verl 0.9.1, including where
a loss departs from the aggregation mode: `sapo` always aggregates seq-mean-token-mean (with
the global sequence count) and `geo_mean` is a plain mean over the B rows (it ignores `agg`
and the global normalisers, so micro-batches do not add up to the whole batch for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlfleet.common.registry import POLICY_LOSSES
from rlfleet.learner.algos.masked import AggMode, agg_loss, masked_mean, zero_masked

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossInfo:
    """What the learner and the config check need to know of a policy loss."""

    params: tuple[str, ...] = ()
    """The parameters it reads (beyond the common ones)."""
    required: tuple[str, ...] = ()
    """Parameters with no default: a run must set them."""
    honours_agg: bool = True
    """False: it aggregates its own way whatever `agg` says (sapo, geo_mean)."""
    needs_old_logprobs: bool = True
    """False: its value and gradient do not read the old log-probs (gpg, reinforce)."""


def register(name: str, info: LossInfo = LossInfo()) -> Callable[[Callable], Callable]:
    """Register a policy loss under `name` (a decorator; also how one from outside is added)."""
    return POLICY_LOSSES.register(name, info)



def _agg(loss_BT, mask, agg, token_weights, norms) -> torch.Tensor:
    if token_weights is not None:
        loss_BT = loss_BT * zero_masked(token_weights, mask).detach()
    return agg_loss(loss_BT, mask, agg, **norms)


def _ratio_terms(log_ratio, adv, clip_low, clip_high):
    """(l1, l2, max): the unclipped and clipped PPO terms of ratio exp(log_ratio)."""
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return unclipped, clipped, torch.maximum(unclipped, clipped)


def _frac(flag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The fraction of valid tokens where `flag` holds."""
    return masked_mean(flag.double(), mask)


def _norms(num_global_tokens, num_global_seqs, norm_length, dp_size) -> dict:
    return {"num_global_tokens": num_global_tokens, "num_global_seqs": num_global_seqs,
            "norm_length": norm_length, "dp_size": dp_size}


@register("ppo", LossInfo(params=("clip_low", "clip_high", "dual_clip")))
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
                    num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
                    clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = 3.0):
    """Clipped PPO (verl's "vanilla"): clamped δ; ℓ = max(−A·r, −A·clip(r, 1 − ε_lo, 1 + ε_hi));
    with dual_clip c > 1, where A < 0: ℓ = min(ℓ, −c·A). c defaults to 3 as in verl; None turns
    the dual clip off (the learner passes `algorithm.dual_clip`, whose None means off)."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
    log_ratio = zero_masked(logprobs - old_logprobs, mask).clamp(-20.0, 20.0)
    adv = zero_masked(advantages, mask)
    l1, l2, pg = _ratio_terms(log_ratio, adv, clip_low, clip_high)
    lower = torch.zeros_like(adv, dtype=torch.bool)
    if dual_clip is not None:
        l3 = -adv * dual_clip
        lower = (pg > l3) & (adv < 0)
        pg = torch.where(adv < 0, torch.minimum(l3, pg), pg)
    loss = _agg(pg, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size))
    with torch.no_grad():
        metrics = {"pg_clipfrac": _frac(l2 > l1, mask), "pg_clipfrac_lower": _frac(lower, mask),
                   "ppo_kl": masked_mean(-log_ratio, mask)}
    return loss, metrics


def _dppo(keep_fn):
    def loss_fn(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
                num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
                clip_low: float = 0.2, clip_high: float = 0.2, ratio_cap: float = 3.0):
        lp = zero_masked(logprobs, mask)
        old = zero_masked(old_logprobs, mask)
        adv = zero_masked(advantages, mask)
        log_ratio = (lp - old).clamp(-20.0, 20.0)
        ratio = torch.exp(log_ratio)
        with torch.no_grad():
            capped = torch.clamp(ratio, max=ratio_cap)
            keep = keep_fn(lp.detach(), old, adv, clip_low, clip_high).to(lp.dtype)
        pg = -adv * capped * lp * keep
        loss = _agg(pg, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size))
        with torch.no_grad():
            metrics = {"pg_clipfrac": masked_mean(1.0 - keep, mask),
                       "pg_clipfrac_lower": masked_mean((ratio > ratio_cap).to(lp.dtype) * keep, mask),
                       "ppo_kl": masked_mean(-log_ratio, mask)}
        return loss, metrics

    return loss_fn


def _tv_keep(lp, old, adv, clip_low, clip_high):
    diff = torch.exp(lp) - torch.exp(old)
    return torch.where(adv > 0, diff <= clip_high, diff >= -clip_low)


def _binary_kl_keep(lp, old, adv, clip_low, clip_high):
    p, p_old = torch.exp(lp), torch.exp(old)
    kl = p_old * (old - lp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
    return torch.where(adv > 0, (kl <= clip_high) | (p <= p_old), (kl <= clip_low) | (p >= p_old))


_DPPO_INFO = LossInfo(params=("clip_low", "clip_high", "ratio_cap"))
dppo_tv_loss = register("dppo_tv", _DPPO_INFO)(_dppo(_tv_keep))
dppo_tv_loss.__doc__ = """DPPO, total-variation trust region: r̄ = sg(min(r, C)) (clamped δ); a
token is kept (v = 1) while p − p_old ≤ ε_hi for A > 0, p − p_old ≥ −ε_lo otherwise (p = e^ℓ:
ε are probability differences); ℓ = −A·r̄·ℓθ·v, a surrogate whose gradient is −A·r̄·v·∇ℓθ.
C = `ratio_cap` (3 by default)."""
dppo_kl_loss = register("dppo_kl", _DPPO_INFO)(_dppo(_binary_kl_keep))
dppo_kl_loss.__doc__ = """DPPO with the binary-KL trust region D(p_old ‖ p) between the Bernoulli
distributions of the sampled token: kept while D ≤ ε (ε_hi for A > 0, ε_lo otherwise) or the
probability moved against the advantage's direction; otherwise as `dppo_tv`."""


@register("gspo", LossInfo(params=("clip_low", "clip_high")))
def gspo_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
              num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
              clip_low: float = 3e-4, clip_high: float = 4e-4):
    """GSPO: the sequence log-ratio s_b = Σ_t m·δ / max(L_b, 1) (δ unclamped) is every token's
    value, while its gradient is ℓθ's own: λ = min(ℓθ − sg(ℓθ) + sg(s_b), 10), ρ = e^λ,
    ℓ = max(−A·ρ, −A·clip(ρ, 1 − ε_lo, 1 + ε_hi)). No dual clip."""
    lp = zero_masked(logprobs, mask)
    log_ratio = lp - zero_masked(old_logprobs, mask)
    adv = zero_masked(advantages, mask)
    lengths = mask.bool().sum(-1).clamp(min=1).to(lp.dtype)
    seq_log_ratio = log_ratio.sum(-1) / lengths
    token_log_ratio = torch.clamp(lp - lp.detach() + seq_log_ratio.detach()[:, None], max=10.0)
    l1, l2, pg = _ratio_terms(token_log_ratio, adv, clip_low, clip_high)
    loss = _agg(pg, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size))
    with torch.no_grad():
        metrics = {"pg_clipfrac": _frac(l2 > l1, mask), "pg_clipfrac_lower": torch.zeros((), dtype=lp.dtype),
                   "ppo_kl": masked_mean(-log_ratio, mask)}
    return loss, metrics


@register("sapo", LossInfo(params=("temp_pos", "temp_neg"), honours_agg=False))
def sapo_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
              num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
              temp_pos: float = 1.0, temp_neg: float = 1.05):
    """SAPO: a soft gate instead of a hard clip, f = σ(τ(r − 1))·4/τ (clamped δ; τ = temp_pos
    for A > 0, else temp_neg), ℓ = −f·A. Always aggregated seq-mean-token-mean (`agg` is
    ignored; the global sequence count is honoured)."""
    log_ratio = zero_masked(logprobs - old_logprobs, mask).clamp(-20.0, 20.0)
    adv = zero_masked(advantages, mask)
    tau = torch.where(adv > 0, torch.full_like(adv, temp_pos), torch.full_like(adv, temp_neg))
    gate = torch.sigmoid(tau * (torch.exp(log_ratio) - 1.0)) * 4.0 / tau
    norms = _norms(num_global_tokens, num_global_seqs, norm_length, dp_size)
    loss = _agg(-gate * adv, mask, "seq-mean-token-mean", token_weights, norms)
    with torch.no_grad():
        zero = torch.zeros((), dtype=log_ratio.dtype)
        metrics = {"pg_clipfrac": zero, "pg_clipfrac_lower": zero, "ppo_kl": masked_mean(-log_ratio, mask)}
    return loss, metrics


@register("gpg", LossInfo(needs_old_logprobs=False))
def gpg_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
             num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1):
    """GPG: plain policy gradient ℓ = −ℓθ·A (no ratio, no clip); no metrics."""
    pg = -zero_masked(logprobs, mask) * zero_masked(advantages, mask)
    return _agg(pg, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size)), {}


@register("reinforce", LossInfo(needs_old_logprobs=False))
def reinforce_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
                   num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1):
    """REINFORCE on the rollout policy's samples: ℓ = −A·ℓθ (·w); `old_logprobs` are the
    rollout's, read only for ppo_kl = mean(ℓrollout − ℓθ)."""
    lp = zero_masked(logprobs, mask)
    pg = -zero_masked(advantages, mask) * lp
    loss = _agg(pg, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size))
    with torch.no_grad():
        metrics = {"ppo_kl": masked_mean(zero_masked(old_logprobs, mask) - lp, mask)}
    return loss, metrics


@register("cispo", LossInfo(params=("clip_low", "clip_high")))
def cispo_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
               num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
               clip_low: float = 0.2, clip_high: float = 0.2):
    """CISPO: the clipped IS weight is a constant and every token keeps a gradient:
    ℓ = −sg(clip(r, 1 − ε_lo, 1 + ε_hi))·A·ℓθ (clamped δ)."""
    lp = zero_masked(logprobs, mask)
    log_ratio = (lp - zero_masked(old_logprobs, mask)).clamp(-20.0, 20.0)
    adv = zero_masked(advantages, mask)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = -clipped.detach() * adv * lp
    loss = _agg(pg, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size))
    with torch.no_grad():
        metrics = {"pg_clipfrac": _frac(ratio != clipped, mask), "pg_clipfrac_lower": torch.zeros((), dtype=lp.dtype),
                   "ppo_kl": masked_mean(-log_ratio, mask)}
    return loss, metrics


@register("dro", LossInfo(params=("beta",), required=("beta",)))
def dro_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
             num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
             beta: float | None = None):
    """DRO: ℓ = −(ℓθ·A − ½β·δ²) (δ unclamped); β > 0 is required."""
    if beta is None or beta <= 0:
        raise ValueError(f"the 'dro' policy loss needs beta > 0 (got {beta})")
    lp = zero_masked(logprobs, mask)
    log_ratio = lp - zero_masked(old_logprobs, mask)
    pg = -(lp * zero_masked(advantages, mask) - 0.5 * beta * log_ratio.square())
    loss = _agg(pg, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size))
    with torch.no_grad():
        metrics = {"ppo_kl": masked_mean(-log_ratio, mask)}
    return loss, metrics


@register("geo_mean", LossInfo(params=("clip_low", "clip_high"), honours_agg=False))
def geo_mean_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
                  num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
                  clip_low: float = 0.4, clip_high: float = 0.4):
    """GMPO: the geometric mean of the token ratios per sequence. δ̃ = clamp(δ, −ε_lo, ε_hi)
    (bounds in log space), δ* = σ·min(σδ, σδ̃) with σ = sign(A) (only the bound on the
    advantage's side acts), R_b = exp(Σ_t m·δ* / L_b), Ā_b = Σ_t m·A / L_b, loss = mean over
    all B rows of −Ā_b·R_b·w_b (w_b the geometric mean of the token weights; an empty row
    counts as 0). `agg` and the global normalisers are ignored."""
    log_ratio = zero_masked(logprobs - old_logprobs, mask)
    adv = zero_masked(advantages, mask)
    bounded = torch.clamp(log_ratio, -clip_low, clip_high)
    sign = torch.sign(adv)
    chosen = zero_masked(sign * torch.minimum(sign * log_ratio, sign * bounded), mask)
    lengths = mask.bool().sum(-1).to(log_ratio.dtype) + 1e-8
    seq_ratio = torch.exp(chosen.sum(-1) / lengths)
    seq_adv = adv.sum(-1) / lengths
    seq_loss = -seq_adv * seq_ratio
    if token_weights is not None:
        log_w = zero_masked(torch.log(token_weights.detach() + 1e-10), mask)
        seq_loss = seq_loss * torch.exp(log_w.sum(-1) / lengths)
    loss = seq_loss.mean()
    with torch.no_grad():
        clipped = log_ratio != bounded
        metrics = {"pg_clipfrac": _frac(clipped & (adv > 0), mask), "pg_clipfrac_lower": _frac(clipped & (adv < 0), mask),
                   "ppo_kl": masked_mean(-log_ratio, mask)}
    return loss, metrics


def _centred_product(adv, lp, mask):
    """(A − mean A)·(ℓθ − mean ℓθ) per token [B, T], the means over the valid tokens (detached)."""
    lp = lp.detach()
    return (adv - masked_mean(adv, mask)) * (lp - masked_mean(lp, mask))


@register("clip_cov", LossInfo(params=("clip_low", "clip_high", "cov_select_frac", "cov_lb", "cov_ub", "generator")))
def clip_cov_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
                  num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
                  clip_low: float = 0.2, clip_high: float = 0.2, cov_select_frac: float = 2e-4,
                  cov_lb: float = 1.0, cov_ub: float = 5.0, generator: torch.Generator | None = None):
    """Clip-Cov: PPO's clipped loss (δ unclamped, no dual clip), with the gradient cut on a
    random K = max(⌊frac·N⌋, 1) of the unclipped tokens whose centred covariance
    cov = (A − Ā)(ℓθ − ℓ̄θ) lies in (cov_lb, cov_ub): the tokens that drive entropy collapse.
    The random pick draws from `generator` (seed it for a reproducible run); when K is at least
    the number of candidates every candidate is cut, deterministically."""
    lp = zero_masked(logprobs, mask)
    log_ratio = lp - zero_masked(old_logprobs, mask)
    adv = zero_masked(advantages, mask)
    l1, l2, pg = _ratio_terms(log_ratio, adv, clip_low, clip_high)
    valid = mask.bool()
    with torch.no_grad():
        cov = _centred_product(adv, lp, mask)
        candidates = (valid & ~((l2 > l1) & valid) & (cov > cov_lb) & (cov < cov_ub)).flatten().nonzero().squeeze(-1)
        k = max(int(cov_select_frac * int(valid.sum())), 1)
        if k < candidates.numel():
            candidates = candidates[torch.randperm(candidates.numel(), generator=generator)[:k].to(candidates.device)]
        keep = torch.ones(valid.numel(), dtype=lp.dtype, device=lp.device)
        keep[candidates] = 0.0
        keep = keep.view_as(lp)
    loss = _agg(pg * keep, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size))
    with torch.no_grad():
        metrics = {"pg_clipfrac": masked_mean(1.0 - keep, mask), "ppo_kl": masked_mean(-log_ratio, mask)}
    return loss, metrics


@register("kl_cov", LossInfo(params=("cov_select_frac", "kl_coef")))
def kl_cov_loss(logprobs, old_logprobs, advantages, mask, *, agg: AggMode = "token-mean", token_weights=None,
                num_global_tokens=None, num_global_seqs=None, norm_length=None, dp_size: int = 1,
                cov_select_frac: float = 2e-4, kl_coef: float = 0.1):
    """KL-Cov: the unclipped −A·r (δ unclamped), plus κ·|δ| on the top K = max(1, ⌊N·frac⌋)
    tokens by centred covariance (A − Ā)(ℓθ − ℓ̄θ). Its only metric, ppo_kl, is mean |δ|."""
    lp = zero_masked(logprobs, mask)
    log_ratio = lp - zero_masked(old_logprobs, mask)
    adv = zero_masked(advantages, mask)
    valid = mask.bool()
    with torch.no_grad():
        cov = _centred_product(adv, lp, mask)
        positions = valid.flatten().nonzero().squeeze(-1)
        k = min(max(1, int(positions.numel() * cov_select_frac)), positions.numel())
        top = positions[torch.topk(cov.flatten()[positions], k).indices]
        penalised = torch.zeros(valid.numel(), dtype=torch.bool, device=lp.device)
        penalised[top] = True
        penalised = penalised.view_as(valid)
    pg = -adv * torch.exp(log_ratio)
    pg = torch.where(penalised, pg + kl_coef * log_ratio.abs(), pg)
    loss = _agg(pg, mask, agg, token_weights, _norms(num_global_tokens, num_global_seqs, norm_length, dp_size))
    with torch.no_grad():
        metrics = {"ppo_kl": masked_mean(log_ratio.abs(), mask)}
    return loss, metrics

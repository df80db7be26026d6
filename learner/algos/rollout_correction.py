"""Rollout correction: importance weights and rejection for tokens the engine sampled from a
policy that differs from the one trained (kernels and precision, or staleness in the
overlapped loop).

Notation: B responses, T response length; `mask[b, t] = 1` where the policy sampled the
token; L_b = Σ_t m; ℓ = ℓtrain − ℓrollout, the log of π_train/π_rollout per token (ℓtrain:
the old log-probs the update's ratio starts from), ℓc = clamp(ℓ, ±20); mm(x) = Σ m·x /
(Σ m + 1e-8), and mm_b the same over row b.

- Importance weights (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
  Off-Policy RL Training"): token level w = exp(ℓc); sequence level w_b = exp(clamp(Σ_t m·ℓ,
  ±20)) on every token of the row. Truncated (TIS): min(w, U) for a threshold U; IcePop
  (a band "a_b"): w where a ≤ w ≤ b, else 0. Optional batch normalisation to mean 1.
- Rejection ("geo-RS" and kin): per-token statistics k1 = −ℓc, k2 = ½ℓc², k3 = e^ℓc − 1 − ℓc,
  tested per token (`token_kX`) or per sequence as a sum, mean or max (`seq_sum_kX`,
  `seq_mean_kX` — the geometric-mean ratio test for k1 —, `seq_max_k2|k3`); a rejected
  token, or every token of a rejected row, leaves the loss mask.
The weights come from the original mask, not the one after rejection; both are constants.
Formulas and option names follow verl 0.9.1's rollout correction.
"""

from __future__ import annotations

import math
import re

import torch

from rlfleet.learner.algos.masked import zero_masked

SAFETY_BOUND = 20.0
_RS_OPTION = re.compile(r"^(token|seq_sum|seq_mean|seq_max)_(k1|k2|k3)$")


def _mm(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """verl's masked mean, Σ m·x / (Σ m + 1e-8) (not `masked_mean`'s max(Σ m, 1)): its metrics to the last digit."""
    m = mask.to(x.dtype)
    x = zero_masked(x, mask)
    if dim is None:
        return x.sum() / (m.sum() + 1e-8)
    return x.sum(dim) / (m.sum(dim) + 1e-8)



def parse_band(threshold: float | str) -> tuple[float | None, float]:
    """(lower, upper) of an IS threshold: a number U (lower None: truncation) or "a_b" (a band)."""
    if isinstance(threshold, str) and "_" in threshold:
        low, high = (float(v) for v in threshold.split("_"))
        if not 0 <= low < high:
            raise ValueError(f"rollout correction band {threshold!r} needs 0 <= a < b")
        return low, high
    upper = float(threshold)
    if upper <= 0:
        raise ValueError(f"rollout correction threshold must be > 0 (got {threshold!r})")
    return None, upper


def _rs_options(options: str | None, thresholds) -> list[tuple[str, str, str]]:
    """[(option, level, stat, threshold)] from a comma list and one threshold each (or one shared)."""
    names = [o.strip() for o in (options or "").split(",") if o.strip()]
    if not names:
        return []
    if thresholds is None:
        raise ValueError(f"rollout correction rs_options={options!r} needs rs_threshold")
    if isinstance(thresholds, str):
        values = [v.strip() for v in thresholds.split(",")]
    elif isinstance(thresholds, (list, tuple)):
        values = list(thresholds)
    else:
        values = [thresholds]
    if len(values) == 1:
        values = values * len(names)
    if len(values) != len(names):
        raise ValueError(f"rs_threshold has {len(values)} values for {len(names)} rs_options ({options!r})")
    out = []
    for name, value in zip(names, values, strict=True):
        match = _RS_OPTION.match(name)
        if not match or name in ("seq_max_k1",):
            raise ValueError(f"unknown rejection option {name!r}; valid: token_kX, seq_sum_kX, seq_mean_kX "
                             "(X = 1, 2, 3) and seq_max_k2, seq_max_k3")
        out.append((name, match[1], match[2], value))
    return out


def _k_stat(log_ratio_c: torch.Tensor, stat: str) -> torch.Tensor:
    if stat == "k1":
        return -log_ratio_c
    if stat == "k2":
        return 0.5 * log_ratio_c.square()
    return torch.expm1(log_ratio_c) - log_ratio_c


def _bounds(stat: str, threshold) -> tuple[float | None, float]:
    """(lower, upper) of a rejection test: log-ratio bounds for k1 ("a_b", or u for 1/u_u),
    an upper bound alone for k2 and k3."""
    if stat != "k1":
        return None, float(threshold)
    if isinstance(threshold, str) and "_" in threshold:
        low, high = (float(v) for v in threshold.split("_"))
    else:
        high = float(threshold)
        low = 1.0 / high
    return math.log(low), math.log(high)


def _spread(x: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """sqrt(mm(x²) − mm(x)²) of x clamped to [low, high] (0 for fewer than two valid tokens)."""
    if mask.bool().sum() < 2:
        return torch.zeros((), dtype=x.dtype)
    c = x.clamp(low, high)
    return torch.sqrt((_mm(c.square(), mask) - _mm(c, mask).square()).clamp(min=0))


def _extremes(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.where(valid, x, torch.full_like(x, -math.inf)).max(),
            torch.where(valid, x, torch.full_like(x, math.inf)).min())


def _rs_metrics(name, per_token, seq, level, mask, low, high) -> dict[str, torch.Tensor]:
    """Statistics of one rejection option's statistic (`per_token` [B, T], `seq` [B])."""
    valid, rows = mask.bool(), mask.bool().any(-1)
    zero = torch.zeros((), dtype=per_token.dtype)
    m = {"mean": _mm(per_token, mask)}
    seq_valid = seq[rows]
    if level != "token" and seq_valid.numel():
        m["max"], m["min"] = seq_valid.max(), seq_valid.min()
        m["fraction_high"] = (seq_valid > high).double().mean()
        m["fraction_low"] = (seq_valid < low).double().mean() if low is not None else zero
    else:
        m["max"], m["min"] = _extremes(per_token, valid)
        m["fraction_high"] = _mm((per_token > high).double(), mask)
        m["fraction_low"] = _mm((per_token < low).double(), mask) if low is not None else zero
    m["std"] = _spread(per_token, mask, 0.0 if low is None else low, high)
    if seq_valid.numel():
        m.update(seq_mean=seq_valid.mean(), seq_std=seq_valid.std() if seq_valid.numel() > 1 else zero,
                 seq_max=seq_valid.max(), seq_min=seq_valid.min(), seq_max_deviation=seq_valid.abs().max(),
                 seq_fraction_high=(seq_valid > high).double().mean())
        if low is not None:
            m["seq_fraction_low"] = (seq_valid < low).double().mean()
    else:
        m.update({k: zero for k in ("seq_mean", "seq_std", "seq_max", "seq_min", "seq_max_deviation",
                                    "seq_fraction_high", "seq_fraction_low")})
    return {f"rollout_rs_{name}_{k}": v for k, v in m.items()}


def rejection_mask(log_ratio: torch.Tensor, mask: torch.Tensor, options: str | None, thresholds
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mask [B, T] after every rejection option (all must pass) and its metrics."""
    valid = mask.bool()
    rows = valid.any(-1)
    lr_c = zero_masked(log_ratio, mask).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    keep_all = torch.ones_like(valid)
    metrics: dict[str, torch.Tensor] = {}
    for name, level, stat, threshold in _rs_options(options, thresholds):
        low, high = _bounds(stat, threshold)
        per_token = zero_masked(_k_stat(lr_c, stat), mask)
        if level == "token":
            seq = _mm(per_token, mask, dim=-1)
            passes = per_token <= high if low is None else (per_token >= low) & (per_token <= high)
        else:
            if level == "seq_sum":
                seq = per_token.sum(-1)
            elif level == "seq_mean":
                seq = _mm(per_token, mask, dim=-1)
            else:
                seq = torch.where(rows, torch.where(valid, per_token, torch.full_like(per_token, -math.inf)).amax(-1),
                                  torch.zeros_like(per_token[:, 0]))
            passes = (seq <= high if low is None else (seq >= low) & (seq <= high))[:, None].expand_as(valid)
            per_token = seq[:, None].expand_as(per_token)
        metrics.update(_rs_metrics(name, per_token, seq, level, mask, low, high))
        rejected = valid & ~passes
        metrics[f"rollout_rs_{name}_masked_fraction"] = _mm(rejected.double(), mask)
        metrics[f"rollout_rs_{name}_seq_masked_fraction"] = rejected.any(-1)[rows].double().mean() if rows.any() \
            else torch.zeros((), dtype=torch.float64)
        keep_all = keep_all & passes
    if metrics:
        metrics["rollout_rs_masked_fraction"] = _mm((valid & ~keep_all).double(), mask)
        metrics["rollout_rs_seq_masked_fraction"] = (valid & ~keep_all).any(-1).double().mean()
    return (mask * keep_all).to(mask.dtype), metrics


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str, threshold: float | str = 2.0,
                       batch_normalize: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IS weights [B, T] (detached, 0 where masked) at `level` ("token" or "sequence") and their metrics."""
    if level not in ("token", "sequence"):
        raise ValueError(f"unknown importance-sampling level {level!r}; valid: token, sequence")
    lower, upper = parse_band(threshold)
    valid = mask.bool()
    lr = zero_masked(log_ratio.detach(), mask)
    if level == "token":
        raw = zero_masked(torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)), mask)
        log_stat = lr
    else:
        log_stat = lr.sum(-1)
        raw = zero_masked(torch.exp(log_stat.clamp(-SAFETY_BOUND, SAFETY_BOUND))[:, None].expand_as(lr), mask)
    if lower is None:
        weights = raw.clamp(max=upper)
    else:
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    metrics = _is_metrics(weights, raw, log_stat, mask, level, lower, upper)
    if batch_normalize:
        if level == "token":
            mean = _mm(weights, mask)
        else:
            rows = valid.any(-1)
            mean = (_mm(weights, mask, dim=-1) * rows).sum() / rows.sum().clamp(min=1)
        if mean > 1e-8:
            weights = weights / mean
        metrics["rollout_is_batch_norm_factor"] = mean if mean > 1e-8 else torch.ones_like(mean)
    return zero_masked(weights, mask), metrics


def _is_metrics(weights, raw, log_stat, mask, level, lower, upper) -> dict[str, torch.Tensor]:
    """Statistics of the weights as truncated or banded (`weights`), and how often the raw ones
    (`raw`; per-row log sums `log_stat` at sequence level) left [lower or 1/U, U]."""
    valid = mask.bool()
    low = 1.0 / upper if lower is None else lower
    m: dict[str, torch.Tensor] = {"rollout_is_mean": _mm(weights, mask)}
    if level == "token":
        m["rollout_is_max"], m["rollout_is_min"] = _extremes(weights, valid)
        m["rollout_is_ratio_fraction_high"] = _mm((raw > upper).double(), mask)
        m["rollout_is_ratio_fraction_low"] = _mm((raw < low).double(), mask)
    else:
        m["rollout_is_max"] = torch.exp(log_stat.max().clamp(max=SAFETY_BOUND))
        m["rollout_is_min"] = torch.exp(log_stat.min())
        m["rollout_is_ratio_fraction_high"] = (log_stat > math.log(upper)).double().mean()
        m["rollout_is_ratio_fraction_low"] = (log_stat < math.log(low)).double().mean() if low > 0 else \
            torch.zeros((), dtype=torch.float64)
    m["rollout_is_std"] = _spread(weights, mask, 0.0, upper)
    clipped = weights.clamp(0.0, upper)
    m["rollout_is_eff_sample_size"] = 1.0 / _mm((clipped / (_mm(clipped, mask) + 1e-8)).square(), mask)
    seq = _mm(weights, mask, dim=-1)
    m["rollout_is_seq_mean"] = seq.mean()
    m["rollout_is_seq_std"] = seq.std() if seq.numel() > 1 else torch.zeros_like(seq.mean())
    m["rollout_is_seq_max"] = seq.max()
    m["rollout_is_seq_min"] = seq.min()
    m["rollout_is_seq_max_deviation"] = (seq - 1.0).abs().max()
    raw_seq = _mm(raw, mask, dim=-1)
    m["rollout_is_seq_fraction_high"] = (raw_seq > upper).double().mean()
    m["rollout_is_seq_fraction_low"] = (raw_seq < low).double().mean()
    if lower is not None:
        m["rollout_is_oob_ratio"] = _mm(((raw < lower) | (raw > upper)).double(), mask)
    return m


def off_policy_metrics(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """How far the trained policy is from the one that sampled: perplexities, KL, χ² (no prefix)."""
    train = zero_masked(old_logprobs.detach(), mask)
    roll = zero_masked(rollout_logprobs.detach(), mask)
    log_ratio = train - roll
    lr_c = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    train_row, roll_row = _mm(train, mask, dim=-1), _mm(roll, mask, dim=-1)
    diff = roll_row - train_row
    seq_log = log_ratio.sum(-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return {
        "training_ppl": torch.exp(-train_row).mean(),
        "training_log_ppl": (-train_row).mean(),
        "rollout_ppl": torch.exp(-roll_row).mean(),
        "rollout_log_ppl": (-roll_row).mean(),
        "kl": _mm(roll - train, mask),
        "k3_kl": _mm(torch.exp(log_ratio) - log_ratio - 1.0, mask),
        "log_ppl_diff": diff.mean(),
        "log_ppl_abs_diff": diff.abs().mean(),
        "log_ppl_diff_max": diff.max(),
        "log_ppl_diff_min": diff.min(),
        "ppl_ratio": torch.exp(diff).mean(),
        "chi2_token": _mm(torch.exp(2.0 * lr_c), mask) - 1.0,
        "chi2_seq": torch.exp(2.0 * seq_log).mean() - 1.0,
    }


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                       is_level: str | None = None, is_threshold: float | str = 2.0, is_batch_normalize: bool = False,
                       rs_options: str | None = None, rs_threshold=None
                       ) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """(IS weights [B, T] or None, the mask after rejection [B, T], metrics under `rollout_corr/`).

    `old_logprobs` are the trained policy's log-probs of the sampled tokens (π_old, or π_prox
    in decoupled PPO), `rollout_logprobs` the engine's. `is_level` None computes no weights;
    `rs_options` None rejects nothing; the off-policy metrics are always computed."""
    log_ratio = zero_masked(old_logprobs.detach() - rollout_logprobs.detach(), mask)
    metrics = dict(off_policy_metrics(old_logprobs, rollout_logprobs, mask))
    weights = None
    if is_level is not None:
        weights, is_metrics = importance_weights(log_ratio, mask, is_level, is_threshold, is_batch_normalize)
        metrics.update(is_metrics)
    new_mask = mask
    if rs_options:
        new_mask, rs_metrics = rejection_mask(log_ratio, mask, rs_options, rs_threshold)
        metrics.update(rs_metrics)
    return weights, new_mask, {f"rollout_corr/{k}": v for k, v in metrics.items()}

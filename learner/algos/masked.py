"""Masked statistics and the one loss-reduction function, `agg_loss`.

Notation: B sequences, T response length; `mask[b, t]` is 1 exactly where the policy sampled
the token (bool or 0/1 of any dtype). Values at masked positions never leak into a result,
even when they are NaN or inf: every reduction selects with `torch.where`, never multiplies.
"""

from __future__ import annotations

from typing import Literal

import torch

AggMode = Literal[
    "token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
AGG_MODES: tuple[str, ...] = AggMode.__args__  # type: ignore[attr-defined]


def zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with every masked position set to 0 (selected, not multiplied: NaN or inf there never leak)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x over mask == 1; masked entries contribute exactly 0 (NaN/inf there are ignored)."""
    selected = zero_masked(x, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ where(m, x, 0) / max(Σ m, 1): an all-zero mask gives 0."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default); fewer than 2 entries give 0."""
    mean = masked_mean(x, mask)
    squares = masked_sum((x - mean) ** 2, mask)
    count = mask.bool().sum().to(x.dtype)
    denom = (count - 1) if unbiased else count
    return squares / denom.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − μ)·rsqrt(var + 1e-8) over the masked entries; μ is added back if not `shift_mean`.

    Masked positions of the result are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return zero_masked(whitened, mask)


def agg_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode,
    num_global_tokens: int | float | torch.Tensor | None = None,
    num_global_seqs: int | float | torch.Tensor | None = None,
    norm_length: int | float | torch.Tensor | None = None,
    dp_size: int = 1,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    Modes (with L_b = Σ_t m[b, t] and v_b = [L_b > 0], the non-empty rows):
      token-mean               Σ L·m / N, N = valid tokens of the whole global batch
      token-sum                Σ L·m
      seq-mean-token-mean      Σ_b v_b·(Σ_t L·m / L_b) / S
      seq-mean-token-sum       Σ_b v_b·(Σ_t L·m) / S
      seq-mean-token-sum-norm  the seq-mean-token-sum value / H (Dr.GRPO; H = T_max by default)
    S is the number of non-empty sequences: a fully masked row (an overlong response under
    `mask_truncated`, say) counts in no mean.

    For micro-batching and data parallelism pass the global normalisers: `num_global_tokens`
    (token-mean), `num_global_seqs` (the seq-mean modes: non-empty sequences) and
    `norm_length` (H, default the local T); the sum of the micro-batches' results then equals
    the whole batch's loss, and so does its gradient. Left at None, each normaliser is taken
    from this batch. `dp_size` multiplies the result (verl's convention for ranks whose
    gradients are averaged; rlfleet's learner weighs its ranks itself and leaves it at 1).
    """
    if mode == "token-mean":
        n_tokens = mask.bool().sum() if num_global_tokens is None else num_global_tokens
        return masked_sum(loss, mask) / _positive(n_tokens, loss) * dp_size
    if mode == "token-sum":
        return masked_sum(loss, mask) * dp_size
    non_empty = mask.bool().any(dim=-1)
    n_seqs = non_empty.sum() if num_global_seqs is None else num_global_seqs
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss, mask, dim=-1)
    elif mode == "seq-mean-token-sum":
        per_seq = masked_sum(loss, mask, dim=-1)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = masked_sum(loss, mask, dim=-1) / (loss.shape[-1] if norm_length is None else norm_length)
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    per_seq = torch.where(non_empty, per_seq, torch.zeros((), dtype=per_seq.dtype, device=per_seq.device))
    return per_seq.sum() / _positive(n_seqs, loss) * dp_size


def _positive(n: int | float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(n, dtype=like.dtype, device=like.device).clamp(min=1)

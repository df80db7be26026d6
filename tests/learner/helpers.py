"""Random right-padded batches for the algos tests (float64 unless asked otherwise)."""

from __future__ import annotations

import torch


def right_padded_mask(lengths: list[int], T: int) -> torch.Tensor:
    """mask [B, T] with the first lengths[b] positions of row b set."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)


def random_batch(seed: int, B: int = 6, T: int = 9, holes: bool = False):
    """(mask, rewards, values, logprobs, old_logprobs, advantages), all [B, T] float64."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    mask = right_padded_mask(lengths, T)
    if holes:  # interleaved observation tokens inside the response
        mask = mask * (torch.rand(B, T, generator=g) > 0.3)
        mask[:, 0] = 1.0
    rand = lambda: torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    logprobs = -rand().abs() - 0.1
    old = logprobs + 0.3 * rand()
    return mask, rand(), rand(), logprobs, old, rand()


def poison(x: torch.Tensor, mask: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """x with `value` written at every masked position."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))

"""Masked statistics and agg_loss (docs/algorithms/kl-and-aggregation.md)."""

from __future__ import annotations

import pytest
import torch

from rlfleet.learner.algos import (
    agg_loss,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
)

from .helpers import poison, random_batch

pytestmark = pytest.mark.unit
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def test_masked_mean_var_by_hand_and_ignore_junk():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 6.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, m).item() == pytest.approx(3.0)
    # unbiased: values 1, 2, 3, 6 → mean 3, Σ(x−μ)² = 14, / 3
    assert masked_var(x, m).item() == pytest.approx(14 / 3)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(14 / 4)
    assert masked_mean(x, m).dtype == torch.float64
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 4.5], dtype=torch.float64))


def test_masked_whiten_moments_and_shift():
    mask, x, *_ = random_batch(0, holes=True)
    white = masked_whiten(poison(x, mask), mask)
    assert masked_mean(white, mask).abs().item() < 1e-12
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(white[mask == 0] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-12)


def test_agg_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert agg_loss(loss, m, "token-mean").item() == pytest.approx(10 / 4)
    assert agg_loss(loss, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert agg_loss(loss, m, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert agg_loss(loss, m, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))
    assert agg_loss(loss, m, "token-mean", num_global_tokens=8).item() == pytest.approx(10 / 8)
    assert agg_loss(loss, m, "token-sum").item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="valid modes: token-mean"):
        agg_loss(loss, m, "seq-sum")  # type: ignore[arg-type]


def _split_loss_and_grad(mode: str, chunks: list[slice], trim: bool, seed: int = 3):
    """PPO loss over micro-batches `chunks` of one batch (global normalisers), summed; and its grad."""
    mask, _, _, logprobs, old, adv = random_batch(seed, B=8, T=10)
    logprobs = logprobs.clone().requires_grad_(True)
    globals_ = {
        "num_global_tokens": mask.sum(),
        "num_global_seqs": mask.shape[0],
        "norm_length": mask.shape[1],
    }
    total = torch.zeros((), dtype=torch.float64)
    for rows in chunks:
        m = mask[rows]
        t = int(m.sum(-1).max()) if trim else m.shape[1]  # micro-batch padded to its own length
        loss, _ = ppo_policy_loss(
            logprobs[rows, :t], old[rows, :t], adv[rows, :t], m[:, :t], agg=mode, **globals_
        )
        loss.backward()
        total = total + loss.detach()
    return total, logprobs.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trim", [False, True])
def test_splitting_into_micro_batches_or_ranks_changes_nothing(mode, trim):
    whole, grad = _split_loss_and_grad(mode, [slice(0, 8)], trim=False)
    for chunks in ([slice(0, 4), slice(4, 8)], [slice(i, i + 2) for i in range(0, 8, 2)], [slice(0, 1), slice(1, 8)]):
        loss, g = _split_loss_and_grad(mode, chunks, trim)
        assert abs(loss.item() - whole.item()) < 1e-6
        torch.testing.assert_close(g, grad, rtol=0, atol=1e-6)


def test_unnormalised_micro_batches_would_differ():
    # The control: without the global token count, per-micro-batch token means do not add up.
    mask, _, _, logprobs, old, adv = random_batch(3, B=8, T=10)
    whole, _ = ppo_policy_loss(logprobs, old, adv, mask)
    halves = [ppo_policy_loss(logprobs[s], old[s], adv[s], mask[s])[0] for s in (slice(0, 4), slice(4, 8))]
    assert abs((halves[0] + halves[1]).item() / 2 - whole.item()) > 1e-4

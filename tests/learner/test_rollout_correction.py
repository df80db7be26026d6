"""Rollout correction (IS weights, rejection, off-policy metrics) and the straight-through KL
estimators, by hand; the learner trains with the rejection mask and the weights."""

from __future__ import annotations

import math

import pytest
import torch

from rlfleet.learner.algos import kl_penalty, rollout_correction

from .helpers import poison, random_batch

pytestmark = pytest.mark.unit
f64 = torch.float64


def _rc(log_ratio_rows, mask=None, **kw):
    lr = torch.tensor(log_ratio_rows, dtype=f64)
    mask = torch.ones_like(lr) if mask is None else torch.tensor(mask, dtype=f64)
    return rollout_correction(lr, torch.zeros_like(lr), mask, **kw)


def test_token_and_sequence_truncated_weights():
    w, mask, m = _rc([[0.0, math.log(3.0)], [math.log(0.5), 0.0]], is_level="token", is_threshold=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0], [0.5, 1.0]], dtype=f64))
    assert torch.equal(mask, torch.ones(2, 2, dtype=f64))
    assert m["rollout_corr/rollout_is_ratio_fraction_high"].item() == pytest.approx(0.25)
    w, _, _ = _rc([[0.1, 0.2], [math.log(3.0), 0.0]], [[1, 1], [1, 0]], is_level="sequence", is_threshold=2.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.3)] * 2, [2.0, 0.0]], dtype=f64))


def test_icepop_zeroes_weights_outside_the_band_and_batch_normalisation_makes_mean_one():
    w, _, m = _rc([[0.0, math.log(6.0), math.log(0.4), math.log(2.0)]], is_level="token", is_threshold="0.5_5.0")
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0, 2.0]], dtype=f64))
    assert m["rollout_corr/rollout_is_oob_ratio"].item() == pytest.approx(0.5)
    w, _, m = _rc([[0.0, math.log(3.0)]], is_level="token", is_threshold=4.0, is_batch_normalize=True)
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5]], dtype=f64))
    assert m["rollout_corr/rollout_is_batch_norm_factor"].item() == pytest.approx(2.0)


def test_geo_rs_rejects_whole_sequences_whose_mean_log_ratio_leaves_the_band():
    # k1 = −log ratio; the sequence mean of row 1 is −0.2 → geometric ratio e^0.2 > 1.1: rejected
    _, mask, m = _rc([[0.05, -0.05], [0.1, 0.3]], rs_options="seq_mean_k1", rs_threshold="0.9_1.1")
    assert torch.equal(mask, torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=f64))
    assert m["rollout_corr/rollout_rs_seq_masked_fraction"].item() == 0.5
    # token_k3 rejects single tokens; options combine with AND and take one threshold each
    lr = [[0.0, 1.0], [0.2, 0.0]]
    _, mask, _ = _rc(lr, rs_options="token_k3,seq_max_k2", rs_threshold="0.1,0.4")
    k3 = math.exp(1.0) - 2.0  # 0.72 > 0.1 → token (0, 1) out; row 0's max k2 = 0.5 > 0.4 → the row too
    assert k3 > 0.1 and torch.equal(mask, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=f64))
    with pytest.raises(ValueError, match="unknown rejection option 'seq_max_k1'"):
        _rc(lr, rs_options="seq_max_k1", rs_threshold=1.1)
    with pytest.raises(ValueError, match="needs rs_threshold"):
        _rc(lr, rs_options="token_k1")


def test_off_policy_metrics_by_hand_and_junk_changes_nothing():
    mask, _, _, train, roll, _ = random_batch(3, B=4, T=6, holes=True)
    w, m2, metrics = rollout_correction(train, roll, mask, is_level="token", rs_options="seq_mean_k1",
                                        rs_threshold="0.5_2.0")
    lr = (train - roll) * mask
    assert metrics["rollout_corr/kl"].item() == pytest.approx(-(lr.sum() / mask.sum()).item())
    assert metrics["rollout_corr/chi2_token"].item() == pytest.approx(
        ((torch.exp(2 * lr) * mask).sum() / mask.sum()).item() - 1.0)
    rows = (train * mask).sum(-1) / mask.sum(-1)
    assert metrics["rollout_corr/training_ppl"].item() == pytest.approx(torch.exp(-rows).mean().item())
    dirty = rollout_correction(poison(train, mask), poison(roll, mask, 1e6), mask, is_level="token",
                               rs_options="seq_mean_k1", rs_threshold="0.5_2.0")
    torch.testing.assert_close(dirty[0], w, rtol=0, atol=0)
    torch.testing.assert_close(dirty[1], m2, rtol=0, atol=0)
    assert all(math.isfinite(v.item()) for v in dirty[2].values())


@pytest.mark.parametrize("base", ["k1", "k2", "k3", "abs"])
def test_straight_through_kl_keeps_the_value_and_takes_the_k2_gradient(base):
    x = torch.tensor([0.3, -1.2, 2.0], dtype=f64, requires_grad=True)
    y = torch.tensor([0.0, 0.5, -0.5], dtype=f64)
    value = kl_penalty(x, y, f"{base}+")
    value.sum().backward()
    torch.testing.assert_close(value.detach(), kl_penalty(x.detach(), y, base))
    torch.testing.assert_close(x.grad, (x - y).detach())
    assert kl_penalty(x.detach(), y, "abs").tolist() == pytest.approx([0.3, 1.7, 2.5])
    assert torch.equal(kl_penalty(x.detach(), y, "low_var_kl"), kl_penalty(x.detach(), y, "k3"))

"""KL estimators and controllers; PPO, value, reward-model and DPO losses; logit helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rlfleet.learner.algos import (
    POLICY_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    dpo_loss,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    ppo_policy_loss,
    reward_model_loss,
    rollout_correction,
    value_loss,
)

from .helpers import poison, random_batch

pytestmark = pytest.mark.unit
f64 = torch.float64


# ---------------------------------------------------------------- KL estimators
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_estimators_match_exact_kl(estimator):
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(12, generator=g, dtype=f64), 0)
    p = torch.softmax(torch.randn(12, generator=g, dtype=f64), 0)
    exact = (q * (q / p).log()).sum().item()
    x = torch.multinomial(q, 100_000, replacement=True, generator=g)
    est = kl_penalty(q.log()[x], p.log()[x], estimator)
    se = est.std().item() / math.sqrt(est.numel())
    assert abs(est.mean().item() - exact) < 3 * se, (est.mean().item(), exact, se)


@settings(max_examples=200, deadline=None)
@given(st.floats(-60, 60), st.floats(-60, 60))
@example(-2.510225304542678e-222, 0.0)  # exp(−Δ) − 1 + Δ cancels to a negative number here
def test_k2_k3_non_negative(a, b):
    lp, ref = torch.tensor([a], dtype=f64), torch.tensor([b], dtype=f64)
    assert kl_penalty(lp, ref, "k3").item() >= 0
    assert kl_penalty(lp, ref, "k2").item() >= 0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_values_and_gradients_finite_far_from_reference(estimator):
    lp = torch.tensor([50.0, -50.0, 0.3], requires_grad=True)
    kl = kl_penalty(lp, torch.zeros(3), estimator)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(lp.grad).all()
    if estimator == "k3":
        assert kl[:2].tolist() == [10.0, 10.0]  # value clamp
        assert kl[2].item() == pytest.approx(math.exp(-0.3) - 1 + 0.3, rel=1e-6)


def test_unknown_estimator_lists_valid():
    with pytest.raises(ValueError, match="valid estimators: k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")  # type: ignore[arg-type]


def test_adaptive_controller_formula_and_state_round_trip():
    ctl = AdaptiveKLController(init_value=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=9.0, n_steps=256)  # error = clip(0.5) = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000), rel=1e-12)
    ctl.update(current_kl=5.4, n_steps=64)  # error = -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 1e4) * (1 - 0.1 * 64 / 1e4), rel=1e-12)
    restored = AdaptiveKLController(init_value=1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    restored.update(0.0, 32)
    ctl.update(0.0, 32)
    assert restored.value == ctl.value and restored.state_dict() == ctl.state_dict()
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


# ---------------------------------------------------------------- PPO policy loss
def test_seed_004_clipped_objective_table():
    ratio = torch.tensor([1.25, 1.1, 2 / 3], dtype=f64)
    adv = torch.tensor([1.3, 0.0, -0.5], dtype=f64)
    objective = []
    for r, a in zip(ratio, adv, strict=True):
        loss, _ = ppo_policy_loss(r.log().view(1, 1), torch.zeros(1, 1, dtype=f64), a.view(1, 1), torch.ones(1, 1))
        objective.append(-loss.item())
    assert objective == pytest.approx([1.56, 0.0, -0.4], abs=1e-12)


def test_ratio_one_gives_minus_mean_advantage():
    mask, _, _, logprobs, _, adv = random_batch(2)
    loss, metrics = ppo_policy_loss(logprobs, logprobs.clone(), adv, mask)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), abs=1e-12)
    assert metrics["pg_clipfrac"].item() == 0.0 and metrics["ppo_kl"].item() == 0.0


def _grad(ratio: float, adv: float, **kw) -> tuple[float, float]:
    lp = torch.tensor([[math.log(ratio)]], dtype=f64, requires_grad=True)
    loss, _ = ppo_policy_loss(lp, torch.zeros(1, 1, dtype=f64), torch.tensor([[adv]], dtype=f64), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), lp.grad.item()


def test_zero_gradient_exactly_where_the_clip_is_active():
    assert _grad(1.5, 1.0)[1] == 0.0  # A > 0, ρ > 1 + ε_high
    assert _grad(0.5, -1.0)[1] == 0.0  # A < 0, ρ < 1 − ε_low
    assert _grad(1.5, 1.0, clip_high=0.6)[1] == pytest.approx(-1.5)  # clip-higher lets it through
    assert _grad(0.5, 1.0)[1] == pytest.approx(-0.5)  # clipping never raises the objective
    assert _grad(1.1, -1.0)[1] == pytest.approx(1.1)


def test_dual_clip_caps_negative_advantage_loss():
    loss, grad = _grad(5.0, -2.0, dual_clip=3.0)
    assert loss == pytest.approx(6.0) and grad == 0.0  # −c·A, no gradient
    loss, grad = _grad(2.0, -2.0, dual_clip=3.0)
    assert loss == pytest.approx(4.0) and grad == pytest.approx(4.0)  # ρ < c: ordinary PPO
    lp = torch.tensor([[math.log(5.0), math.log(1.1)]], dtype=f64)
    _, metrics = ppo_policy_loss(lp, torch.zeros(1, 2, dtype=f64), torch.tensor([[-2.0, 1.0]], dtype=f64),
                                 torch.ones(1, 2), dual_clip=3.0)
    assert metrics["pg_clipfrac_lower"].item() == 0.5


def test_metrics_by_hand():
    lp = torch.tensor([[math.log(1.5), math.log(1.0), math.log(0.5), 0.0]], dtype=f64)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=f64)
    mask = torch.tensor([[1, 1, 1, 0]])
    _, metrics = ppo_policy_loss(lp, torch.zeros(1, 4, dtype=f64), adv, mask)
    assert metrics["pg_clipfrac"].item() == pytest.approx(1 / 3)
    expected_kl = -(math.log(1.5) + math.log(0.5)) / 3  # mean of −δ = logπ_old − logπ
    assert metrics["ppo_kl"].item() == pytest.approx(expected_kl)


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), float("-inf")])
def test_policy_and_value_losses_ignore_masked_junk(junk):
    mask, returns, values, logprobs, old, adv = random_batch(4, holes=True)
    clean_lp = logprobs.clone().requires_grad_(True)
    dirty_lp = poison(logprobs, mask, junk).requires_grad_(True)
    loss, _ = ppo_policy_loss(clean_lp, old, adv, mask, dual_clip=3.0)
    loss_j, _ = ppo_policy_loss(dirty_lp, poison(old, mask, junk), poison(adv, mask, junk), mask, dual_clip=3.0)
    loss.backward()
    loss_j.backward()
    assert loss_j.item() == loss.item()
    torch.testing.assert_close(dirty_lp.grad, clean_lp.grad, rtol=0, atol=0)
    assert torch.all(dirty_lp.grad[mask == 0] == 0)
    v, _ = value_loss(values, values + 0.1, returns, mask, clip=0.2)
    v_j, _ = value_loss(poison(values, mask, junk), poison(values + 0.1, mask, junk),
                        poison(returns, mask, junk), mask, clip=0.2)
    assert v_j.item() == v.item()


def test_token_weights_scale_per_token_loss():
    mask, _, _, logprobs, old, adv = random_batch(6)
    w, _, _ = rollout_correction(old, old - 0.5 * torch.ones_like(old), mask, is_level="token", is_threshold=1.2)
    assert torch.all(w[mask.bool()] == 1.2)  # exp(0.5) > C
    w2, _, _ = rollout_correction(old, old + 0.5, mask, is_level="token", is_threshold=2.0)
    torch.testing.assert_close(w2, math.exp(-0.5) * mask)
    base, _ = ppo_policy_loss(logprobs, old, adv, mask)
    scaled, _ = ppo_policy_loss(logprobs, old, adv, mask, token_weights=w)
    assert scaled.item() == pytest.approx(1.2 * base.item(), rel=1e-12)


def test_policy_loss_registry():
    assert {n for n, f in POLICY_LOSSES.items() if f.__module__.startswith("rlfleet.")} == set(POLICY_LOSSES.builtin)
    assert POLICY_LOSSES["ppo"] is ppo_policy_loss
    with pytest.raises(KeyError, match="valid names: ppo, gspo, cispo"):
        POLICY_LOSSES["a2c"]


# ---------------------------------------------------------------- value loss
def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 3.0]], dtype=f64)
    old = torch.tensor([[0.5, 0.5, 0.0]], dtype=f64)
    returns = torch.tensor([[2.0, 1.0, 0.0]], dtype=f64)
    # V_clip = (0.7, 0.3, 0.2): errors (1, 1, 9) vs clipped (1.69, 0.49, 0.04) → max (1.69, 1, 9)
    loss, metrics = value_loss(values, old, returns, torch.ones(1, 3), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1 + 9) / 3)
    assert metrics["vf_clipfrac"].item() == pytest.approx(1 / 3)


# ---------------------------------------------------------------- logits helpers
def test_logprobs_and_entropy_from_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g, dtype=f64) * 4
    ids = torch.randint(0, 17, (3, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, ids), ref, rtol=0, atol=1e-12)
    ent = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), ent, rtol=0, atol=1e-12)
    half = logprobs_from_logits(logits.to(torch.bfloat16), ids)
    assert half.dtype == torch.float32
    exact_of_rounded = torch.log_softmax(logits.to(torch.bfloat16).double(), -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(half.double(), exact_of_rounded, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- preference losses
def test_reward_model_and_dpo_losses():
    chosen, rejected = torch.tensor([2.0, 0.0], dtype=f64), torch.tensor([1.0, 1.0], dtype=f64)
    loss, metrics = reward_model_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["accuracy"].item() == 0.5
    same = torch.tensor([-3.0, -7.0], dtype=f64)
    loss, _ = dpo_loss(same, same, same, same, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    loss, metrics = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]),
                             torch.tensor([-3.0]), beta=0.5)
    # β·[(−1 + 2) − (−5 + 3)] = 1.5
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
    assert metrics["accuracy"].item() == 1.0

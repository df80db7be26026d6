"""Token rewards and advantage estimators against hand-worked cases and plain-loop oracles."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlfleet.learner.algos import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    UnknownNameError,
    gae,
    grpo_advantages,
    masked_mean,
    masked_var,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_level_rewards,
)

from .helpers import poison, random_batch, right_padded_mask

pytestmark = pytest.mark.unit
f64 = torch.float64


def gae_oracle(rewards, values, mask, gamma, lam):
    """Per sequence over its unmasked positions only: A_t = Σ_l (γλ)^l δ_{t+l}, no bootstrap past the end."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [rewards[b, t].item() for t in idx]
        v = [values[b, t].item() for t in idx]
        n = len(idx)
        deltas = [r[i] + gamma * (v[i + 1] if i + 1 < n else 0.0) - v[i] for i in range(n)]
        for i in range(n):
            adv[b, idx[i]] = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i))
    return adv


def test_seed_004_worked_example():
    rewards = torch.tensor([[1.0, 2.0, 0.0]], dtype=f64)
    values = torch.tensor([[1.5, 2.0, 0.5]], dtype=f64)
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.3, 0.0, -0.5]], dtype=f64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, adv + values)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("holes", [False, True])
def test_gae_equals_loop_oracle(seed, holes):
    mask, rewards, values, *_ = random_batch(seed, B=7, T=11, holes=holes)
    gamma, lam = 0.93, 0.87
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = gae_oracle(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, (expected + values) * mask, rtol=0, atol=1e-10)
    assert adv.dtype == f64


def test_gae_special_cases():
    mask, rewards, values, *_ = random_batch(11, B=5, T=8)
    adv0, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(5, 1, dtype=f64)], dim=1)
    torch.testing.assert_close(adv0, (rewards + 0.9 * next_v - values) * mask, rtol=0, atol=1e-12)
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv1, (to_go - values) * mask, rtol=0, atol=1e-12)


def test_observation_tokens_are_skipped_not_steps():
    # Response tokens a, b, c with two observation tokens between b and c.
    mask = torch.tensor([[1, 1, 0, 0, 1]], dtype=f64)
    rewards = torch.tensor([[0.5, -1.0, 7.0, 7.0, 2.0]], dtype=f64)
    values = torch.tensor([[0.3, 0.1, 9.0, 9.0, -0.4]], dtype=f64)
    compact = (torch.tensor([[0.5, -1.0, 2.0]], dtype=f64), torch.tensor([[0.3, 0.1, -0.4]], dtype=f64))
    adv, _ = gae(rewards, values, mask, 0.9, 0.8)
    expected, _ = gae(*compact, torch.ones(1, 3), 0.9, 0.8)
    torch.testing.assert_close(adv[mask.bool()], expected[0], rtol=0, atol=1e-12)
    rpp, _ = reinforce_pp_advantages(rewards, mask, 0.9)
    rpp_c, _ = reinforce_pp_advantages(compact[0], torch.ones(1, 3), 0.9)
    torch.testing.assert_close(rpp[mask.bool()], rpp_c[0], rtol=0, atol=1e-12)


def test_token_rewards_place_score_on_last_response_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=f64)
    kl = torch.full((4, 4), 2.0, dtype=f64)
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=f64)
    r = token_level_rewards(scores, poison(kl, mask), mask, kl_coef=0.1)
    expected = torch.tensor(
        [[-0.2, -0.2, 9.8, 0.0], [-0.2, -0.2, -0.2, 19.8], [0.0, 0.0, 0.0, 0.0], [-0.2, 0.0, 39.8, 0.0]],
        dtype=f64,
    )
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-12)


def test_grpo_equal_rewards_give_zero_and_groups_are_standardised():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 5.0, 3.0], dtype=f64)
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 3])
    mask = right_padded_mask([3, 1, 2, 4, 4, 2, 1], 4)
    adv = grpo_advantages(scores, groups, mask)
    assert not torch.isnan(adv).any()
    assert torch.all(adv[:3] == 0)
    per_seq = adv[3:, 0]
    assert per_seq.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert per_seq.std().item() == pytest.approx(1.0, abs=1e-5)  # unbiased std, eps = 1e-6
    assert torch.all(adv[mask == 0] == 0)
    assert torch.all(adv == adv[:, :1] * mask)  # broadcast over tokens
    dr = grpo_advantages(scores, groups, mask, norm_by_std=False)
    torch.testing.assert_close(dr[3:, 0], torch.tensor([-2.5, -0.5, 2.5, 0.5], dtype=f64))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_group_estimators_are_permutation_equivariant(seed):
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 4, (12,), generator=g)
    scores = torch.randint(0, 3, (12,), generator=g).to(f64)
    mask = right_padded_mask(torch.randint(1, 6, (12,), generator=g).tolist(), 5)
    perm = torch.randperm(12, generator=g)
    for fn in (grpo_advantages, rloo_advantages):
        torch.testing.assert_close(fn(scores[perm], groups[perm], mask[perm]), fn(scores, groups, mask)[perm])


def test_rloo_by_hand_and_sums_to_zero_per_group():
    scores = torch.tensor([1.0, 2.0, 6.0, 4.0, 0.0], dtype=f64)
    groups = torch.tensor([0, 0, 0, 1, 1])
    adv = rloo_advantages(scores, groups, torch.ones(5, 2))[:, 0]
    torch.testing.assert_close(adv, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 4.0, -4.0], dtype=f64))
    assert adv[:3].sum().item() == pytest.approx(0.0, abs=1e-12)
    assert adv[3:].sum().item() == pytest.approx(0.0, abs=1e-12)
    single = rloo_advantages(torch.tensor([3.0]), torch.tensor([0]), torch.ones(1, 2))
    assert torch.all(single == 3.0)  # a singleton has no baseline: it keeps its score


def test_reinforce_pp_returns_and_whitening():
    mask, rewards, *_ = random_batch(5, B=6, T=7)
    gamma = 0.95
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma)
    expected = torch.zeros_like(rewards)
    for b in range(6):
        running = 0.0
        for t in reversed(range(7)):
            if mask[b, t]:
                running = rewards[b, t].item() + gamma * running
                expected[b, t] = running
    torch.testing.assert_close(ret, expected, rtol=0, atol=1e-12)
    assert masked_mean(adv, mask).abs().item() < 1e-12
    assert masked_var(adv, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_reinforce_pp_baseline_subtracts_group_mean_score():
    scores = torch.tensor([1.0, 3.0, 10.0, 20.0], dtype=f64)
    groups = torch.tensor([0, 0, 1, 1])
    mask = right_padded_mask([2, 3, 1, 3], 3)
    rewards = token_level_rewards(scores, torch.zeros(4, 3, dtype=f64), mask, 0.0)
    adv, ret = reinforce_pp_baseline_advantages(rewards, scores, groups, mask, gamma=1.0)
    shifted = token_level_rewards(scores - torch.tensor([2.0, 2.0, 15.0, 15.0], dtype=f64),
                                  torch.zeros(4, 3, dtype=f64), mask, 0.0)
    expected_adv, expected_ret = reinforce_pp_advantages(shifted, mask, 1.0)
    torch.testing.assert_close(ret, expected_ret)
    torch.testing.assert_close(adv, expected_adv)


def _inputs(seed: int, junk: float | None = None) -> AdvantageInputs:
    mask, rewards, values, logprobs, *_ = random_batch(seed, B=8, T=6, holes=True)
    collision = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=f64)
    if junk is not None:
        rewards, values = poison(rewards, mask, junk), poison(values, mask, junk)
        logprobs, collision = poison(logprobs, mask, junk), poison(collision, mask, junk)
    scores = torch.arange(8, dtype=f64) % 3
    return AdvantageInputs(
        token_rewards=rewards, scores=scores, group_ids=torch.arange(8) // 4,
        mask=mask, values=values, gamma=0.97, lam=0.9, baselines=torch.linspace(-1, 1, 8, dtype=f64),
        old_logprobs=logprobs, sum_pi_squared=collision, reward_components=torch.stack([scores, 1 - scores], 1),
    )


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -1e30])
def test_junk_at_masked_positions_changes_nothing(name, junk):
    clean, dirty = _inputs(1), _inputs(1, junk)
    estimator = ADVANTAGE_ESTIMATORS[name]
    adv, ret = estimator(clean)
    adv_j, ret_j = estimator(dirty)
    torch.testing.assert_close(adv_j, adv, rtol=0, atol=0)
    torch.testing.assert_close(ret_j, ret, rtol=0, atol=0)
    assert torch.all(adv[clean.mask == 0] == 0)


def test_registry_matches_config_and_names_valid_choices():
    assert set(ADVANTAGE_ESTIMATORS) >= set(ADVANTAGE_ESTIMATORS.builtin)
    with pytest.raises(UnknownNameError, match="valid names: gae, grpo, dr_grpo, rloo"):
        ADVANTAGE_ESTIMATORS["ppo2"]
    bare = AdvantageInputs(
        token_rewards=torch.zeros(1, 1), scores=torch.zeros(1), group_ids=torch.zeros(1), mask=torch.ones(1, 1)
    )
    with pytest.raises(ValueError, match="needs critic values"):
        ADVANTAGE_ESTIMATORS["gae"](bare)


def test_float64_stays_float64_and_float32_stays_float32():
    for dtype in (torch.float64, torch.float32):
        x = _inputs(2)
        x = dataclasses.replace(x, **{k: v.to(dtype) for k, v in vars(x).items()
                                      if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "mask"})
        for name, estimator in ADVANTAGE_ESTIMATORS.items():
            adv, ret = estimator(x)
            assert adv.dtype == ret.dtype == dtype, name
        assert token_level_rewards(x.scores, x.token_rewards, x.mask, 0.1).dtype == dtype

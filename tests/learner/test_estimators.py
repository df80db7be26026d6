"""The estimators beyond GAE/GRPO/RLOO/REINFORCE++: hand-worked groups, plain-loop oracles for
the optimal token baselines, and the one singleton convention; the registry's capabilities."""

from __future__ import annotations

import pytest
import torch

from rlfleet.common.registry import GROUP_ESTIMATORS
from rlfleet.learner.algos import ADVANTAGE_ESTIMATORS, AdvantageInputs, masked_mean, masked_var

from .helpers import random_batch, right_padded_mask

pytestmark = pytest.mark.unit
f64 = torch.float64


def _x(scores, groups, mask=None, **kw) -> AdvantageInputs:
    scores = torch.tensor(scores, dtype=f64)
    mask = torch.ones(len(scores), 3, dtype=f64) if mask is None else mask
    last = torch.zeros_like(mask)
    last[torch.arange(len(scores)), mask.sum(-1).long() - 1] = 1.0
    return AdvantageInputs(token_rewards=last * scores[:, None], scores=scores, group_ids=torch.tensor(groups),
                           mask=mask, **kw)


def _first(name, x):
    return ADVANTAGE_ESTIMATORS[name](x)[0][:, 0]


def test_pass_at_k_rewards_only_each_groups_best_response():
    x = _x([1.0, 3.0, 2.0, 0.0, 5.0, 5.5], [0, 0, 0, 0, 1, 1])
    std0 = torch.tensor([1.0, 3.0, 2.0, 0.0], dtype=f64).std().item()
    std1 = torch.tensor([5.0, 5.5], dtype=f64).std().item()
    want = [0, (3 - 2) / (std0 + 1e-6), 0, 0, 0, 0.5 / (std1 + 1e-6)]
    torch.testing.assert_close(_first("grpo_passk", x), torch.tensor(want, dtype=f64))
    plain = _first("grpo_passk", _x([1.0, 3.0, 2.0, 0.0], [0, 0, 0, 0], scale_by_std=False))
    torch.testing.assert_close(plain, torch.tensor([0, 1.0, 0, 0], dtype=f64))
    with pytest.raises(ValueError, match="at least 2 responses per prompt"):
        ADVANTAGE_ESTIMATORS["grpo_passk"](_x([1.0, 2.0], [0, 1]))


def test_opo_subtracts_the_length_weighted_group_mean():
    mask = right_padded_mask([1, 3, 2, 2], 3)
    x = _x([1.0, 2.0, 4.0, 0.0], [0, 0, 1, 1], mask)
    baseline0 = (1 * 1.0 + 3 * 2.0) / 4
    torch.testing.assert_close(_first("opo", x), torch.tensor([1 - baseline0, 2 - baseline0, 2.0, -2.0], dtype=f64))


def test_gpg_rescales_by_the_share_of_nonzero_scores():
    x = _x([1.0, 0.0, 0.0, 0.0], [0, 0, 1, 1], f_norm=2.0)
    alpha = 4 / 1  # one non-zero score among four responses
    torch.testing.assert_close(_first("gpg", x), torch.tensor([alpha * 0.5 / 2, -alpha * 0.5 / 2, 0, 0], dtype=f64))


def test_remax_subtracts_the_greedy_reward_from_the_return_to_go():
    rewards = torch.tensor([[0.5, 0.0, 1.0], [2.0, 0.0, 0.0]], dtype=f64)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=f64)
    x = AdvantageInputs(token_rewards=rewards, scores=torch.zeros(2, dtype=f64), group_ids=torch.tensor([0, 1]),
                        mask=mask, baselines=torch.tensor([1.0, -1.0], dtype=f64))
    adv, ret = ADVANTAGE_ESTIMATORS["remax"](x)
    torch.testing.assert_close(ret, torch.tensor([[1.5, 0, 1.0], [2.0, 0, 0]], dtype=f64))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0, 0.0], [3.0, 0, 0]], dtype=f64))
    with pytest.raises(ValueError, match="'remax' estimator needs baselines"):
        ADVANTAGE_ESTIMATORS["remax"](_x([1.0], [0]))


def test_gdpo_normalises_each_component_in_its_group_then_whitens_the_weighted_sum():
    mask = right_padded_mask([3, 2, 3, 1], 3)
    comps = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 10.0], [1.0, 0.0]], dtype=f64)
    x = _x([1.0, 0.0, 11.0, 1.0], [0, 0, 1, 1], mask, reward_components=comps,
           component_weights=torch.tensor([1.0, 0.5], dtype=f64))
    adv = ADVANTAGE_ESTIMATORS["gdpo"](x)[0]
    # group 0: component 0 is (1, 0) → ±0.5/(σ + ε), σ = √½; component 1 is constant → 0.
    # group 1: component 0 constant → 0; component 1 is (10, 0) → ±5/(σ + ε), σ = √50, weight ½.
    half = 0.5 / (0.5 ** 0.5 + 1e-6)
    per_seq = torch.tensor([half, -half, 0.5 * 5 / (50 ** 0.5 + 1e-6), -0.5 * 5 / (50 ** 0.5 + 1e-6)], dtype=f64)
    raw = per_seq[:, None] * mask
    mean, var = masked_mean(raw, mask), masked_var(raw, mask)
    torch.testing.assert_close(adv, (raw - mean) / torch.sqrt(var + 1e-8) * mask, atol=1e-12, rtol=0)
    one = ADVANTAGE_ESTIMATORS["gdpo"](_x([1.0, 0.0, 11.0, 1.0], [0, 0, 1, 1], mask))[0]
    assert masked_mean(one, mask).abs().item() < 1e-12 and masked_var(one, mask).item() == pytest.approx(1.0)


def _otb_oracle(rewards, mask, groups, old, collision, zero_tail=True, eps=1e-8):
    """A plain loop over groups and positions."""
    B, T = mask.shape
    G = torch.zeros(B, T, dtype=f64)
    W = torch.zeros(B, T, dtype=f64)
    for b in range(B):
        run = 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                run += rewards[b, t].item()
            G[b, t] = run
        acc = 0.0
        for t in range(T):
            if mask[b, t]:
                acc += 1 - 2 * torch.exp(old[b, t]).item() + collision[b, t].item()
            W[b, t] = acc
    adv = torch.zeros(B, T, dtype=f64)
    for g in set(groups.tolist()):
        rows = [b for b in range(B) if groups[b] == g]
        lengths = sorted(int(mask[b].sum()) for b in rows)
        for b in rows:
            for t in range(T):
                if not mask[b, t]:
                    continue
                base = 0.0
                if len(rows) > 1:
                    num = sum((G[j, t] * W[j, t] * mask[j, t]).item() for j in rows)
                    den = sum((W[j, t] * mask[j, t]).item() for j in rows) + eps
                    base = num / den
                    longest = int(mask[b].sum()) == lengths[-1] and lengths[-1] > lengths[-2]
                    if zero_tail and longest and t >= lengths[-2]:
                        base = 0.0
                adv[b, t] = G[b, t] - base
    return adv


@pytest.mark.parametrize("zero_tail", [True, False])
def test_optimal_token_baseline_equals_a_loop_oracle(zero_tail):
    mask, rewards, _, old, *_ = random_batch(21, B=9, T=7)
    rewards = rewards * mask
    collision = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1), dtype=f64) * 0.3 + 0.05
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 3])
    x = AdvantageInputs(token_rewards=rewards, scores=rewards.sum(-1), group_ids=groups, mask=mask,
                        old_logprobs=old, sum_pi_squared=collision, zero_tail=zero_tail)
    adv, ret = ADVANTAGE_ESTIMATORS["optimal_token_baseline"](x)
    torch.testing.assert_close(adv, _otb_oracle(rewards, mask, groups, old, collision, zero_tail), rtol=1e-12, atol=1e-12)
    # right-padded responses have no holes: the multi-turn variant, by k-th token, is the same
    tir, _ = ADVANTAGE_ESTIMATORS["tir_optimal_token_baseline"](x)
    torch.testing.assert_close(tir, adv, rtol=1e-12, atol=1e-12)


def test_multi_turn_optimal_token_baseline_aligns_generated_tokens_not_positions():
    """Observation tokens (holes) shift a response's k-th generated token to a later position; the
    tir variant baselines it with the other responses' k-th tokens, as if the holes were not there."""
    mask, rewards, _, old, *_ = random_batch(5, B=6, T=8, holes=True)
    rewards = rewards * mask
    collision = torch.full(mask.shape, 0.2, dtype=f64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    x = AdvantageInputs(token_rewards=rewards, scores=rewards.sum(-1), group_ids=groups, mask=mask,
                        old_logprobs=old, sum_pi_squared=collision)
    tir, _ = ADVANTAGE_ESTIMATORS["tir_optimal_token_baseline"](x)
    lengths = mask.sum(-1).long()
    compact = lambda t: torch.stack([torch.cat([row[m.bool()], row.new_zeros(8 - int(m.sum()))])  # noqa: E731
                                     for row, m in zip(t, mask, strict=True)])
    cmask = right_padded_mask(lengths.tolist(), 8)
    flat = AdvantageInputs(token_rewards=compact(rewards), scores=rewards.sum(-1), group_ids=groups, mask=cmask,
                           old_logprobs=compact(old), sum_pi_squared=compact(collision))
    want, _ = ADVANTAGE_ESTIMATORS["optimal_token_baseline"](flat)
    torch.testing.assert_close(compact(tir), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS - {"grpo_passk"}))
def test_a_singleton_group_has_no_baseline(name):
    """One convention for every group-relative estimator: a prompt with one response keeps its
    own (scaled) score as its advantage."""
    mask = torch.ones(3, 2, dtype=f64)
    x = _x([2.0, 1.0, 3.0], [0, 1, 1], mask, old_logprobs=torch.full((3, 2), -1.0, dtype=f64),
           sum_pi_squared=torch.full((3, 2), 0.3, dtype=f64))
    adv = ADVANTAGE_ESTIMATORS[name](x)[0]
    if name in ("gdpo", "reinforce_pp_baseline"):  # whitened over the batch afterwards: the sign shows it
        assert adv[0, 0] > 0.5
        return
    expected = {"grpo": 2.0 / (1 + 1e-6), "gpg": 2.0}.get(name, 2.0)
    assert adv[0, -1].item() == pytest.approx(expected, rel=1e-9), name


def test_registry_capabilities_match_the_config():
    builtin = {n: f for n, f in ADVANTAGE_ESTIMATORS.items() if f.__module__.startswith("rlfleet.")}
    assert set(builtin) == set(ADVANTAGE_ESTIMATORS.builtin)  # the names the config knows before import
    assert GROUP_ESTIMATORS == {n for n, f in builtin.items() if f.info.group_relative}
    assert {n for n, f in builtin.items() if f.info.needs_critic} == {"gae"}
    assert {n for n, f in builtin.items() if f.info.needs_baselines} == {"remax"}

"""Every registered policy loss: hand-worked values, float64 gradcheck, junk at masked
positions, micro-batch invariance, and the stop-gradient semantics that tell them apart.
(Their agreement with verl 0.9.1 on random cases: scripts/verl_parity.py, run by hand.)"""

from __future__ import annotations

import math

import pytest
import torch

from rlfleet.learner.algos import POLICY_LOSSES, agg_loss

from .helpers import poison, random_batch

pytestmark = pytest.mark.unit
f64 = torch.float64
PARAMS = {"dro": {"beta": 0.5}, "clip_cov": {"cov_select_frac": 1.0, "cov_lb": -10.0, "cov_ub": 10.0},
          "kl_cov": {"cov_select_frac": 0.25}}


def _one(name: str, ratio: float, adv: float, **kw) -> tuple[float, float]:
    """(loss, d loss / d logπ) of one token with logπ_old = log 0.5 and the given ratio."""
    old = math.log(0.5)
    lp = torch.tensor([[old + math.log(ratio)]], dtype=f64, requires_grad=True)
    loss, _ = POLICY_LOSSES[name](lp, torch.tensor([[old]], dtype=f64), torch.tensor([[adv]], dtype=f64),
                                  torch.ones(1, 1), **{**PARAMS.get(name, {}), **kw})
    loss.backward()
    return loss.item(), lp.grad.item()


def test_hand_worked_single_tokens():
    # GPG: −logπ·A, gradient −A whatever the ratio
    loss, grad = _one("gpg", 1.7, 2.0)
    assert loss == pytest.approx(-math.log(0.85) * 2.0) and grad == pytest.approx(-2.0)
    # CISPO: −sg(clip(r))·A·logπ; r = 1.5 clipped to 1.2, and the gradient still flows
    loss, grad = _one("cispo", 1.5, 1.0)
    assert loss == pytest.approx(-1.2 * math.log(0.75)) and grad == pytest.approx(-1.2)
    # PPO at the same point: the clip holds, no gradient
    assert _one("ppo", 1.5, 1.0)[1] == 0.0
    # GSPO with one token: the sequence ratio is the token's; inside the clip its gradient is −A·r
    loss, grad = _one("gspo", 1.0002, 1.0)
    assert loss == pytest.approx(-1.0002) and grad == pytest.approx(-1.0002)
    assert _one("gspo", 1.01, 1.0)[1] == 0.0  # past 1 + 4e-4
    # SAPO: −σ(τ(r − 1))·4/τ·A with τ = 1 for A > 0; at r = 1 the value is −2A, the slope −A·r
    loss, grad = _one("sapo", 1.0, 1.0)
    assert loss == pytest.approx(-2.0) and grad == pytest.approx(-1.0)
    # DPPO-TV: p − p_old = 0.75 − 0.5 > 0.2 for A > 0 → masked; 0.55 − 0.5 kept: −A·min(r, C)·∇logπ
    assert _one("dppo_tv", 1.5, 1.0)[1] == 0.0
    assert _one("dppo_tv", 1.1, 1.0)[1] == pytest.approx(-1.1)
    assert _one("dppo_tv", 4.0 / 3.0 * 1.0, -1.0, ratio_cap=1.2)[1] == pytest.approx(1.2)  # cap binds
    # DRO: −(logπ·A − ½β·δ²), gradient −A + β·δ
    loss, grad = _one("dro", 2.0, 1.0)
    assert grad == pytest.approx(-1.0 + 0.5 * math.log(2.0))
    # GMPO (geo_mean): A > 0 caps the log-ratio at +0.4 only
    loss, grad = _one("geo_mean", math.exp(0.6), 1.0)
    assert loss == pytest.approx(-math.exp(0.4)) and grad == 0.0
    loss, grad = _one("geo_mean", math.exp(-0.6), 1.0)
    assert loss == pytest.approx(-math.exp(-0.6)) and grad == pytest.approx(-math.exp(-0.6))
    # REINFORCE: −A·logπ
    assert _one("reinforce", 3.0, -1.0)[1] == pytest.approx(1.0)


def test_kl_cov_penalises_the_top_covariance_tokens_and_clip_cov_cuts_them():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], dtype=f64, requires_grad=True)
    old = lp.detach() - 0.1  # r = e^0.1 everywhere
    adv = torch.tensor([[2.0, -1.0, 1.0, 0.0]], dtype=f64)
    # cov_j = (A − 0.5)(logπ − (−1.25)): 0.375, 1.125, 0.375, 0.125 → the top one is token 1
    loss, metrics = POLICY_LOSSES["kl_cov"](lp, old, adv, torch.ones(1, 4), cov_select_frac=0.25, kl_coef=0.3)
    base = (-adv * math.exp(0.1)).sum().item()
    assert loss.item() == pytest.approx((base + 0.3 * 0.1) / 4)
    assert metrics["ppo_kl"].item() == pytest.approx(0.1)
    # clip_cov: candidates with cov in (1.0, 1.2) — token 1 — lose their gradient
    lp.grad = None
    loss, metrics = POLICY_LOSSES["clip_cov"](lp, old, adv, torch.ones(1, 4), cov_select_frac=1.0, cov_lb=1.0,
                                              cov_ub=1.2)
    loss.backward()
    assert lp.grad[0, 1].item() == 0.0 and lp.grad[0, 0].item() == pytest.approx(-2.0 * math.exp(0.1) / 4)
    assert metrics["pg_clipfrac"].item() == pytest.approx(0.25)


def test_clip_cov_random_pick_is_seeded():
    mask, _, _, lp, old, adv = random_batch(7, B=8, T=9)
    picks = []
    for seed in (0, 0, 1):
        loss, m = POLICY_LOSSES["clip_cov"](lp, old, adv, mask, cov_select_frac=0.05, cov_lb=-10.0, cov_ub=10.0,
                                            generator=torch.Generator().manual_seed(seed))
        picks.append(loss.item())
    assert picks[0] == picks[1] != picks[2]


SURROGATES = ("cispo", "dppo_tv", "dppo_kl")
"""Losses whose value holds logπ times constant (stop-gradient) factors computed from logπ:
their gradient is by design not the derivative of their value; checked against its formula."""


@pytest.mark.parametrize("name", sorted(set(POLICY_LOSSES) - set(SURROGATES)))
def test_gradcheck_in_float64(name):
    """The gradient is the derivative of the value. GSPO's holds for advantages (and weights) that
    are constant over each sequence, as every outcome estimator gives: its token gradient then is
    that of its sequence-level objective."""
    mask, _, _, lp, old, adv = random_batch(11, B=3, T=5)
    weights = 0.5 + torch.rand(mask.shape, generator=torch.Generator().manual_seed(2), dtype=f64)
    if name == "gspo":  # per sequence, as an outcome estimator's advantages and sequence-level IS weights
        adv, weights = adv[:, :1].expand_as(adv).clone(), weights[:, :1].expand_as(weights).clone()
    params = {**PARAMS.get(name, {})}
    if name in ("ppo", "gspo", "clip_cov"):
        params.update(clip_low=0.9, clip_high=9.0)  # away from the kinks of the clip
    if name == "clip_cov":
        params.update(cov_lb=100.0, cov_ub=200.0)  # no token selected

    def f(x):
        return POLICY_LOSSES[name](x, old, adv, mask, token_weights=weights, **params)[0]

    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", SURROGATES)
def test_surrogate_gradients_follow_their_formula(name):
    """cispo: −sg(clip(r, 1 − ε_lo, 1 + ε_hi))·A·m / N; dppo: −A·sg(min(r, C))·v·m / N with v the
    trust-region keep flag (p − p_old within ε for TV)."""
    mask, _, _, lp, old, adv = random_batch(13, B=4, T=6)
    x = lp.clone().requires_grad_(True)
    low, high = {"cispo": (0.2, 0.3), "dppo_tv": (0.02, 0.03), "dppo_kl": (0.002, 0.003)}[name]
    loss, _ = POLICY_LOSSES[name](x, old, adv, mask, clip_low=low, clip_high=high)
    loss.backward()
    r = torch.exp(lp - old)
    if name == "cispo":
        factor = r.clamp(1 - low, 1 + high)
    else:
        diff = torch.exp(lp) - torch.exp(old)
        if name == "dppo_tv":
            keep = torch.where(adv > 0, diff <= high, diff >= -low)
        else:
            p, q = torch.exp(lp), torch.exp(old)
            kl = q * (old - lp) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
            keep = torch.where(adv > 0, (kl <= high) | (p <= q), (kl <= low) | (p >= q))
        factor = r.clamp(max=3.0) * keep
        assert 0 < keep[mask.bool()].sum() < mask.sum()  # the trust region acts on some tokens
    torch.testing.assert_close(x.grad, -factor * adv * mask / mask.sum(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 1e6])
def test_junk_at_masked_positions_changes_nothing(name, junk):
    mask, _, _, lp, old, adv = random_batch(3, B=5, T=7, holes=True)
    weights = 0.5 + torch.rand(mask.shape, generator=torch.Generator().manual_seed(4), dtype=f64)
    out = []
    for dirty in (False, True):
        x = (poison(lp, mask, junk) if dirty else lp.clone()).requires_grad_(True)
        args = [poison(t, mask, junk) if dirty else t for t in (old, adv)]
        w = poison(weights, mask, abs(junk)) if dirty else weights
        loss, _ = POLICY_LOSSES[name](x, *args, mask, token_weights=w,
                                      generator=torch.Generator().manual_seed(0), **PARAMS.get(name, {})) \
            if name == "clip_cov" else POLICY_LOSSES[name](x, *args, mask, token_weights=w, **PARAMS.get(name, {}))
        loss.backward()
        out.append((loss.item(), x.grad))
    assert out[0][0] == out[1][0]
    torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=0)
    assert torch.all(out[1][1][mask == 0] == 0)


MICRO_INVARIANT = sorted(n for n, f in POLICY_LOSSES.items() if f.info.honours_agg and n not in ("clip_cov", "kl_cov"))
MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("name", [*MICRO_INVARIANT, "sapo"])
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_global_normalisers_add_up_to_the_whole_batch(name, mode):
    """Loss and gradient. sapo ignores `agg` (always seq-mean-token-mean) but honours the global
    sequence count; geo_mean (a plain mean over rows) and clip_cov/kl_cov (tokens chosen by
    their covariance within the call, as verl does) are not split-invariant and are left out."""
    mask, _, _, lp, old, adv = random_batch(5, B=8, T=10)
    mask[3] = 0  # an empty row counts in no sequence mean
    norms = {"num_global_tokens": mask.sum(), "num_global_seqs": int(mask.bool().any(-1).sum()),
             "norm_length": mask.shape[1]}

    def run(chunks):
        x = lp.clone().requires_grad_(True)
        total = sum(POLICY_LOSSES[name](x[c], old[c], adv[c], mask[c], agg=mode, **norms, **PARAMS.get(name, {}))[0]
                    for c in chunks)
        total.backward()
        return total.item(), x.grad

    whole, grad = run([slice(0, 8)])
    for chunks in ([slice(0, 4), slice(4, 8)], [slice(0, 1), slice(1, 3), slice(3, 8)]):
        loss, g = run(chunks)
        assert loss == pytest.approx(whole, abs=1e-9)
        torch.testing.assert_close(g, grad, rtol=0, atol=1e-9)


def test_sequence_means_leave_empty_rows_out():
    loss = torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, 0.0]], dtype=f64)
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]])
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 3.0) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((3.0 + 3.0) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((3.0 + 3.0) / 2 / 2)
    assert agg_loss(loss, mask, "token-sum", dp_size=2).item() == pytest.approx(12.0)


def test_stop_gradient_semantics_differ_where_the_losses_do():
    """At ratio 1 GSPO, CISPO, vanilla PPO, GPG and DPPO share a gradient (−A per token over N),
    while the values differ: CISPO's and GPG's contain logπ itself (surrogates)."""
    mask, _, _, lp, _, adv = random_batch(9, B=4, T=6)
    grads, values = {}, {}
    for name in ("ppo", "gspo", "cispo", "gpg", "dppo_tv"):
        x = lp.clone().requires_grad_(True)
        loss, _ = POLICY_LOSSES[name](x, lp, adv, mask)
        loss.backward()
        grads[name], values[name] = x.grad, loss.item()
    for name in grads:
        torch.testing.assert_close(grads[name], grads["ppo"], rtol=0, atol=1e-12, msg=name)
    assert values["ppo"] == pytest.approx(values["gspo"])
    assert values["cispo"] == pytest.approx(values["gpg"]) != pytest.approx(values["ppo"])


def test_losses_that_need_a_parameter_name_it():
    mask, _, _, lp, old, adv = random_batch(1)
    with pytest.raises(ValueError, match="'dro' policy loss needs beta > 0"):
        POLICY_LOSSES["dro"](lp, old, adv, mask)
    assert POLICY_LOSSES["dro"].info.required == ("beta",)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        POLICY_LOSSES["ppo"](lp, old, adv, mask, dual_clip=0.5)


def test_the_config_reaches_each_loss_and_leaves_the_rest_to_its_defaults():
    from rlfleet.common.config import RunConfig
    from rlfleet.learner.objective import loss_params

    def params(**algorithm):
        return loss_params(RunConfig.model_validate({"algorithm": algorithm}).algorithm,
                           torch.Generator().manual_seed(0))

    assert params() == {"dual_clip": None}  # ppo: the config's dual clip is off unless set
    assert params(dual_clip=2.5, clip_high=0.28) == {"dual_clip": 2.5, "clip_high": 0.28}
    assert params(policy_loss="gspo") == {}  # the paper's 3e-4 / 4e-4
    assert params(policy_loss="dro", loss={"beta": 0.2}) == {"beta": 0.2}
    assert set(params(policy_loss="clip_cov", loss={"cov_select_frac": 0.01})) == {"cov_select_frac", "generator"}
    assert params(policy_loss="sapo", loss={"temp_neg": 2.0, "beta": 1.0}) == {"temp_neg": 2.0}  # beta: not sapo's

"""rlfleet's RL math against verl 0.9.1's own functions, on random float64 cases with junk at
padded positions: policy losses (value, gradient with respect to the current log-probs,
metrics), loss aggregation, KL estimators, advantage estimators (at valid positions) and
rollout correction (weights, rejection masks, every metric). A dev tool, run by hand: verl is
not a dependency of rlfleet and this script is not part of the test suite.

Set-up (verl's wheel and the few packages its modules import, outside the project's venv):

    pip download --no-deps -d /tmp/verl verl==0.9.1 && (cd /tmp/verl && unzip -q verl-0.9.1-*.whl)
    .venv/bin/pip install --no-deps --target /tmp/verl-deps tensordict omegaconf \
        antlr4-python3-runtime codetiming hydra-core pyvers cloudpickle orjson
    PYTHONPATH=/tmp/verl:/tmp/verl-deps .venv/bin/python scripts/verl_parity.py

It prints each mismatch and ends with the number of cases compared and failed (exit 1 on any).
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import torch
import verl.trainer.ppo.core_algos as V
import verl.trainer.ppo.rollout_corr_helper as RC
from omegaconf import OmegaConf
from verl.workers.config.actor import ActorConfig, PolicyLossConfig

from rlfleet.learner.algos import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInputs,
    agg_loss,
    kl_penalty,
    rollout_correction,
)

f64 = torch.float64
fails: list[str] = []
compared = [0]


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")


def close(name, a, b, mask=None, rtol=1e-6, atol=1e-9):
    compared[0] += 1
    a, b = torch.as_tensor(a, dtype=f64), torch.as_tensor(b, dtype=f64)
    if mask is not None:
        a, b = a * mask, b * mask
    if not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
        fails.append(name)
        say("FAIL", name, (a - b).abs().max().item())


def with_junk(x, mask, g, scale=1.0):
    """`x` with random values at the masked positions."""
    return torch.where(mask.bool(), x, torch.randn(mask.shape, generator=g, dtype=f64) * scale)


def random_mask(g, B, T, holes, empty_row):
    """Right-padded rows of random length; `holes`: interior zeros; `empty_row`: one row all 0."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(f64)
    if holes:
        mask = mask * (torch.rand(B, T, generator=g) > 0.3)
        mask[:, 0] = 1
    if empty_row is not None:
        mask[empty_row] = 0
    return mask


def loss_case(seed, B=6, T=7, holes=False, empty=False):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(g, B, T, holes, 1 if empty else None)
    lp = -torch.rand(B, T, generator=g, dtype=f64) * 2 - 0.05
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=f64)
    adv = torch.randn(B, T, generator=g, dtype=f64)

    def junk(x):
        return with_junk(x, mask, g, 3.0)

    return mask, junk(lp), junk(old), junk(adv), g


LOSSES = {"ppo": "vanilla", "gspo": "gspo", "cispo": "cispo", "gpg": "gpg", "sapo": "sapo", "dppo_tv": "dppo_tv",
          "dppo_kl": "dppo_kl", "clip_cov": "clip_cov", "kl_cov": "kl_cov", "geo_mean": "geo_mean", "dro": "dro"}
MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

def verl_cfg(lo, hi, c, params, gbi):
    pl = PolicyLossConfig(clip_cov_ratio=params.get("cov_select_frac", 1.0), clip_cov_lb=params.get("cov_lb", -5.0),
        clip_cov_ub=params.get("cov_ub", 5.0), kl_cov_ratio=params.get("cov_select_frac", 1.0),
        ppo_kl_coef=params.get("kl_coef", 0.1), dro_beta=params.get("beta", 0.3))
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=lo, clip_ratio_high=hi,
        clip_ratio_c=c, tau_pos=params.get("temp_pos", 1.0), tau_neg=params.get("temp_neg", 1.05), policy_loss=pl,
        global_batch_info=gbi)
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": lo, "clip_ratio_high": hi, "clip_ratio_c": c,
        "tau_pos": params.get("temp_pos", 1.0), "tau_neg": params.get("temp_neg", 1.05),
        "policy_loss": {"clip_cov_ratio": params.get("cov_select_frac", 1.0), "clip_cov_lb": params.get("cov_lb", -5.0),
                        "clip_cov_ub": params.get("cov_ub", 5.0), "kl_cov_ratio": params.get("cov_select_frac", 1.0),
                        "ppo_kl_coef": params.get("kl_coef", 0.1), "dro_beta": params.get("beta", 0.3)},
        "global_batch_info": gbi})

for seed, (ours, theirs), mode, holes, empty, weighted, glob in itertools.product(range(3), LOSSES.items(), MODES, [False, True], [False, True], [False, True], [False, True]):
    mask, lp, old, adv, g = loss_case(seed * 31 + len(ours), holes=holes, empty=empty)
    w = torch.where(mask.bool(), torch.rand(mask.shape, generator=g, dtype=f64) * 2, torch.rand(mask.shape, generator=g, dtype=f64) * 5) if weighted else None
    lo, hi, c = 0.15, 0.28, 3.0
    params = {"cov_select_frac": 1.0, "cov_lb": -5.0, "cov_ub": 5.0, "kl_coef": 0.1, "beta": 0.3, "temp_pos": 1.0, "temp_neg": 1.05}
    gbi = {}
    ours_norm = {}
    if glob:
        gbi = {"dp_size": 1, "batch_num_tokens": int(mask.sum()) + 3, "global_batch_size": 9, "loss_scale_factor": 11}
        ours_norm = {"num_global_tokens": int(mask.sum()) + 3, "num_global_seqs": 9, "norm_length": 11}
    kw = {"ppo": dict(clip_low=lo, clip_high=hi, dual_clip=c), "dppo_tv": dict(clip_low=lo, clip_high=hi, ratio_cap=c),
          "dppo_kl": dict(clip_low=lo, clip_high=hi, ratio_cap=c), "gspo": dict(clip_low=lo, clip_high=hi),
          "cispo": dict(clip_low=lo, clip_high=hi), "geo_mean": dict(clip_low=lo, clip_high=hi),
          "clip_cov": dict(clip_low=lo, clip_high=hi, cov_select_frac=1.0, cov_lb=-5.0, cov_ub=5.0),
          "kl_cov": dict(cov_select_frac=1.0, kl_coef=0.1), "dro": dict(beta=0.3), "sapo": dict(temp_pos=1.0, temp_neg=1.05),
          "gpg": {}}[ours]
    if ours == "kl_cov":
        kw["cov_select_frac"] = 0.3
        params["cov_select_frac"] = 0.3
    lp1 = lp.clone().requires_grad_(True)
    l1, m1 = POLICY_LOSSES[ours](lp1, old, adv, mask, agg=mode, token_weights=w, **ours_norm, **kw)
    l1.backward()
    lp2 = lp.clone().requires_grad_(True)
    cfg = verl_cfg(lo, hi, c, params, gbi)
    l2, m2 = V.get_policy_loss_fn(theirs)(old, lp2, adv, mask, mode, cfg, w)
    l2.backward()
    tag = f"{ours}/{mode}/s{seed}/h{holes}/e{empty}/w{weighted}/g{glob}"
    close(tag + "/loss", l1.detach(), l2.detach())
    close(tag + "/grad", lp1.grad, lp2.grad)
    for k, v in m2.items():
        key = k.split("/")[-1]
        if key in m1:
            close(tag + "/" + key, m1[key], v, rtol=1e-5, atol=1e-7)

# agg
for seed, mode in itertools.product(range(4), MODES):
    mask, lp, _, _, g = loss_case(seed, empty=True)
    close(f"agg/{mode}", agg_loss(lp, mask, mode), V.agg_loss(lp, mask, mode))

# kl
for mode in ["k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+", "low_var_kl", "mse", "kl"]:
    mask, lp, old, _, _ = loss_case(5)
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    x = kl_penalty(a, old, mode)
    y = V.kl_penalty(b, old, mode)
    x.sum().backward()
    y.sum().backward()
    close(f"kl/{mode}/value", x.detach(), y.detach(), atol=1e-12)
    close(f"kl/{mode}/grad", a.grad, b.grad, atol=1e-12)

say("losses/agg/kl fails:", len(fails))
for seed, mode in itertools.product(range(3), MODES):
    mask, lp, old, adv, g = loss_case(seed + 50, holes=True, empty=True)
    w = torch.where(mask.bool(), torch.rand(mask.shape, generator=g, dtype=f64) * 2, torch.rand(mask.shape, generator=g, dtype=f64))
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    l1, m1 = POLICY_LOSSES["reinforce"](a, old, adv, mask, agg=mode, token_weights=w)
    cfg = verl_cfg(0.2, 0.2, 3.0, {}, {})
    l2, m2 = V.compute_policy_loss_reinforce(old, b, adv, mask, mode, cfg, w)
    l1.backward()
    l2.backward()
    close(f"reinforce/{mode}/loss", l1.detach(), l2.detach())
    close(f"reinforce/{mode}/grad", a.grad, b.grad)
    close(f"reinforce/{mode}/kl", m1["ppo_kl"], m2["actor/ppo_kl"])
say("reinforce fails:", len(fails))


def estimator_case(seed, B=12, T=7, holes=False, layout="groups", empty=False):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(g, B, T, holes, 2 if empty else None)
    if layout == "groups":
        index = np.array([i // 4 for i in range(B)])
    elif layout == "single":
        index = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5][:B])
    scores = torch.randn(B, generator=g, dtype=f64).round(decimals=1)
    last = (mask * torch.arange(1, T + 1)).argmax(-1)
    R = torch.zeros(B, T, dtype=f64)
    R[torch.arange(B), last] = scores
    R = R * (mask.sum(-1, keepdim=True) > 0)
    R2 = torch.randn(B, T, generator=g, dtype=f64) * mask   # dense token rewards
    old = -torch.rand(B, T, generator=g, dtype=f64) * 2
    spi = torch.rand(B, T, generator=g, dtype=f64) * 0.5 + 0.1
    isw = torch.rand(B, T, generator=g, dtype=f64) * 2
    base = torch.randn(B, generator=g, dtype=f64)
    comps = torch.randn(B, 3, generator=g, dtype=f64).round(decimals=1)
    return mask, index, R, R2, old, spi, isw, base, comps

def inputs(mask, index, R, **kw):
    return AdvantageInputs(token_rewards=R, scores=R.sum(-1), group_ids=torch.as_tensor(index), mask=mask, **kw)

for seed, holes, layout, empty, std in itertools.product(range(4), [False, True], ["groups", "single"], [False, True], [True, False]):
    mask, index, R, R2, old, spi, isw, base, comps = estimator_case(seed, holes=holes, layout=layout, empty=empty)
    tag = f"s{seed}/h{holes}/{layout}/e{empty}/std{std}"
    cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": std, "gamma": 0.97})
    x = inputs(mask, index, R, scale_by_std=std)
    close("grpo/" + tag, ADVANTAGE_ESTIMATORS["grpo"](x)[0], V.compute_grpo_outcome_advantage(R, mask, index, norm_adv_by_std_in_grpo=std)[0], mask)
    close("rloo/" + tag, ADVANTAGE_ESTIMATORS["rloo"](x)[0], V.compute_rloo_outcome_advantage(R, mask, index)[0], mask)
    close("opo/" + tag, ADVANTAGE_ESTIMATORS["opo"](x)[0], V.compute_opo_outcome_advantage(R, mask, index)[0], mask)
    close("rpp_base/" + tag, ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](x)[0], V.compute_reinforce_plus_plus_baseline_outcome_advantage(R, mask, index)[0], mask)
    close("rpp/" + tag, ADVANTAGE_ESTIMATORS["reinforce_pp"](inputs(mask, index, R2, gamma=0.97))[0], V.compute_reinforce_plus_plus_outcome_advantage(R2, mask, cfg)[0], mask)
    close("gpg/" + tag, ADVANTAGE_ESTIMATORS["gpg"](inputs(mask, index, R, f_norm=0.7))[0], V.compute_gpg_outcome_advantage(R, mask, index, f_norm=0.7)[0], mask)
    close("remax/" + tag, ADVANTAGE_ESTIMATORS["remax"](inputs(mask, index, R2, baselines=base))[0], V.compute_remax_outcome_advantage(R2, base, mask)[0], mask)
    close("gdpo1/" + tag, ADVANTAGE_ESTIMATORS["gdpo"](x)[0], V.compute_gdpo_outcome_advantage(R, mask, index, norm_adv_by_std_in_grpo=std)[0], mask, rtol=1e-5)
    if layout == "groups":
        cfg2 = OmegaConf.create({"norm_adv_by_std_in_grpo": std})
        close("passk/" + tag, ADVANTAGE_ESTIMATORS["grpo_passk"](x)[0], V.compute_grpo_passk_outcome_advantage(R, mask, index, config=cfg2)[0], mask)
    for zt, w in itertools.product([True, False], [None, isw]):
        y = inputs(mask, index, R2, old_logprobs=old, sum_pi_squared=spi, is_weights=w, zero_tail=zt)
        close(f"otb/zt{zt}/w{w is not None}/" + tag, ADVANTAGE_ESTIMATORS["optimal_token_baseline"](y)[0],
              V.compute_optimal_token_baseline_advantage(R2, mask, index, old, spi, w, handle_zero_tail=zt)[0], mask)
        close(f"tir/zt{zt}/w{w is not None}/" + tag, ADVANTAGE_ESTIMATORS["tir_optimal_token_baseline"](y)[0],
              V.compute_multi_turn_optimal_token_baseline_advantage(R2, mask, index, old, spi, w, handle_zero_tail=zt)[0], mask)
    # gae
    values = torch.randn(mask.shape, dtype=f64)
    a1, r1 = ADVANTAGE_ESTIMATORS["gae"](inputs(mask, index, R2, values=values, gamma=0.95, lam=0.9))
    a2, r2 = V.compute_gae_advantage_return(R2, values, mask, 0.95, 0.9)
    close("gae/adv/" + tag, a1, a2, mask)
    close("gae/ret/" + tag, r1, r2, mask)

# rollout correction
presets = [dict(is_level="token", is_threshold=2.0), dict(is_level="sequence", is_threshold=2.0),
           dict(is_level="token", is_threshold="0.5_5.0"), dict(is_level="sequence", is_threshold="0.5_5.0"),
           dict(is_level="token", is_threshold=1.5, is_batch_normalize=True), dict(is_level="sequence", is_threshold=3.0, is_batch_normalize=True),
           dict(rs_options="seq_mean_k1", rs_threshold="0.999_1.001"), dict(rs_options="seq_mean_k1", rs_threshold="0.95_1.05"),
           dict(is_level="token", is_threshold=2.0, rs_options="seq_mean_k1", rs_threshold="0.9_1.1"),
           dict(is_level="sequence", is_threshold=2.0, rs_options="seq_sum_k1", rs_threshold="0.5_2.0"),
           dict(rs_options="token_k3", rs_threshold=0.05), dict(rs_options="seq_max_k2,token_k1", rs_threshold="0.1,1.5"),
           dict(rs_options="seq_mean_k3,seq_max_k3", rs_threshold=0.02), dict(rs_options="token_k2", rs_threshold=0.01), dict(),
           dict(is_level="token", is_threshold="2.0")]
for seed, p, holes, empty in itertools.product(range(3), presets, [False, True], [False, True]):
    mask, index, R, R2, old, *_ = estimator_case(seed + 100, holes=holes, empty=empty)
    g = torch.Generator().manual_seed(seed)
    roll = old + 0.15 * torch.randn(mask.shape, generator=g, dtype=f64)
    o, r_ = with_junk(old, mask, g), with_junk(roll, mask, g)
    w1, m1, met1 = rollout_correction(o, r_, mask, **p)
    vkw = {"rollout_is": p.get("is_level"), "rollout_is_threshold": p.get("is_threshold", 2.0), "rollout_is_batch_normalize": p.get("is_batch_normalize", False),
           "rollout_rs": p.get("rs_options"), "rollout_rs_threshold": p.get("rs_threshold")}
    w2, m2, met2 = RC.compute_rollout_correction_and_rejection_mask(o, r_, mask, **vkw)
    tag = f"rc/{p}/s{seed}/h{holes}/e{empty}"
    if w2 is not None:
        w2 = w2.batch["rollout_is_weights"]
        close(tag + "/w", w1, w2, mask)
    elif w1 is not None:
        fails.append(tag + "/w-none")
    close(tag + "/mask", m1, m2)
    missing = [k for k in met2 if k not in met1]
    if missing:
        say("MISSING", tag, missing)
    for k, v in met2.items():
        if k in met1:
            close(tag + "/" + k, met1[k], v, rtol=1e-5, atol=1e-7)
    extra = [k for k in met1 if k not in met2]
    if extra:
        say("EXTRA", tag, extra)
say("estimators/rc fails:", len(fails))


say(f"{compared[0]} comparisons, {len(fails)} failed")
sys.exit(1 if fails else 0)

"""The learner at `rollout.max_staleness` >= 1 (in-process, no Ray): the staleness bound,
decoupled PPO's IS weights made inside the update, and the ratio against the engine's log-probs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlfleet.common.config import RunConfig
from rlfleet.common.records import Experience
from rlfleet.learner.learner import Learner, StaleRolloutError
from rlfleet.learner.step_data import (
    correction,
    needs_prepare,
    reuses_update_logprobs,
)
from tests.learner.test_learner import (
    make_rollouts,
    record_gradients,
    single_update_batch,
    single_update_config,
)

pytestmark = pytest.mark.unit


def async_config(**algorithm) -> RunConfig:
    cfg = single_update_config()
    return cfg.model_copy(update={
        "rollout": cfg.rollout.model_copy(update={"max_staleness": 1}),
        "algorithm": cfg.algorithm.model_copy(update=algorithm),
    })


def behaviour_logprobs(exp: Experience, shift: float = 0.7, seed: int = 3) -> Experience:
    """The engine's log-probs: the policy's, moved by up to ±`shift` per token, so that some IS
    weights π_prox/π_behav pass the cap and some do not."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for r, old in zip(exp.rollouts, exp.old_logprobs, strict=True):
        noise = (torch.rand(len(old), generator=g) * 2 - 1) * shift
        rollouts.append(dataclasses.replace(r, logprobs=(torch.tensor(old) + noise).tolist()))
    return dataclasses.replace(exp, rollouts=rollouts)


def gradients_of(cfg: RunConfig, model_dir, exp: Experience, version: int = 1) -> tuple[dict, dict]:
    learner = Learner(cfg, str(model_dir))
    learner.version = version  # the learner has moved on since the rollouts' version 0
    grads = record_gradients(learner)
    metrics = learner.train_step(exp).metrics
    (only,) = grads
    return only, metrics


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, atol=1e-7, rtol=1e-5, msg=name)


def test_the_learner_takes_records_up_to_max_staleness_old_and_refuses_older(tiny_model_dir):
    cfg = async_config()
    learner = Learner(cfg, str(tiny_model_dir))
    learner.version = 3
    learner.prepare(make_rollouts(version=2))  # one version old: within the bound
    with pytest.raises(StaleRolloutError, match=r"versions \[1\] reached a learner at version 3 "
                                                r"\(rollout.max_staleness=1\)"):
        learner.prepare(make_rollouts(version=1))
    _, own = single_update_batch(Learner(single_update_config(), str(tiny_model_dir)), make_rollouts())
    stale = [dataclasses.replace(r, policy_version=1) for r in own.rollouts]
    with pytest.raises(StaleRolloutError, match=r"versions \[1\] reached a learner at version 3"):
        learner.train_step(dataclasses.replace(own, rollouts=stale))


def test_decoupled_ppo_weighs_tokens_in_the_update_as_with_prepare(tiny_model_dir):
    """One update per batch: decoupled PPO needs no `prepare` — π_prox is the update's own
    forward pass, and the IS weights min(π_prox/π_behav, cap) it computes there give the same
    gradients as weights computed upfront from `prepare`'s log-probs. The weights matter: with
    the engine agreeing with the learner the gradients differ."""
    cfg = async_config()
    rc = correction(cfg)
    assert reuses_update_logprobs(cfg) and not needs_prepare(cfg) and (rc.is_level, rc.is_threshold) == ("token", 2.0)
    prepared, own = single_update_batch(Learner(cfg, str(tiny_model_dir)), make_rollouts())
    prepared = behaviour_logprobs(prepared)
    own = dataclasses.replace(own, rollouts=prepared.rollouts)
    want, want_metrics = gradients_of(cfg, tiny_model_dir, prepared)
    got, got_metrics = gradients_of(cfg, tiny_model_dir, own)
    assert_same(got, want)
    assert got_metrics["loss/policy_avg"] == pytest.approx(want_metrics["loss/policy_avg"], abs=1e-6)
    agreeing = dataclasses.replace(own, rollouts=behaviour_logprobs(prepared, shift=0.0).rollouts)
    unweighted, _ = gradients_of(cfg, tiny_model_dir, agreeing)
    assert max((unweighted[n] - got[n]).abs().max().item() for n in got) > 1e-4


def test_behaviour_ratio_trains_against_the_engine_logprobs(tiny_model_dir):
    """`algorithm.off_policy: behaviour`: the ratio's denominator is the engine's log-probs, no
    `prepare` and no IS weight — the same update as a synchronous one handed those log-probs."""
    cfg = async_config(off_policy="behaviour")
    assert not needs_prepare(cfg) and not correction(cfg).enabled
    prepared, own = single_update_batch(Learner(cfg, str(tiny_model_dir)), make_rollouts())
    own = dataclasses.replace(own, rollouts=behaviour_logprobs(prepared).rollouts)
    got, got_metrics = gradients_of(cfg, tiny_model_dir, own)
    engine = [list(r.logprobs) for r in own.rollouts]
    want, _ = gradients_of(single_update_config(), tiny_model_dir, dataclasses.replace(own, old_logprobs=engine),
                           version=0)
    assert_same(got, want)
    assert got_metrics["policy/clipfrac_avg"] > 0  # the engine is ±0.7 nats off: the clip acts


def test_async_prepare_needs(tiny_model_dir):
    """Which async configs still call `prepare`: a critic (values) or a colocated reference."""
    gae = async_config(off_policy="behaviour", advantage_estimator="gae", kl_in="reward")
    assert needs_prepare(gae)
    assert needs_prepare(async_config(advantage_estimator="gae", kl_in="reward"))
    with pytest.raises(ValueError, match="rollout.sleep_between_steps=true"):
        RunConfig.model_validate({"rollout": {"max_staleness": 1, "sleep_between_steps": True}})


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_truncated_responses_get_no_loss_with_mask_truncated(tiny_model_dir, loss_agg):
    """`algorithm.mask_truncated`: what a response cut by the token limit says cannot move the
    gradient (its tokens get no loss, KL or entropy), and the gradient stays finite."""
    cfg = single_update_config()
    cfg = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"mask_truncated": True,
                                                                               "loss_agg": loss_agg})})
    rollouts = [dataclasses.replace(r, finish_reason="stop" if i % 2 else "length")
                for i, r in enumerate(make_rollouts())]
    _, own = single_update_batch(Learner(cfg, str(tiny_model_dir)), rollouts)
    other = [r if r.finish_reason == "stop" else dataclasses.replace(r, response_ids=[t % 50 + 7 for t in r.response_ids])
             for r in rollouts]
    got, _ = gradients_of(cfg, tiny_model_dir, own, version=0)
    changed, _ = gradients_of(cfg, tiny_model_dir, dataclasses.replace(own, rollouts=other), version=0)
    assert_same(changed, got)
    assert all(torch.isfinite(g).all() for g in got.values())
    plain = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"mask_truncated": False})})
    unmasked, _ = gradients_of(plain, tiny_model_dir, own, version=0)
    assert max((unmasked[n] - got[n]).abs().max().item() for n in got) > 1e-5


def test_a_learner_engine_mismatch_on_the_same_weights_refuses_the_step(tiny_model_dir):
    """`algorithm.max_logprob_diff`: measured on the records of the learner's own version
    (`rollout/logprob_diff_same_version`); past the limit the step raises, naming the likely
    causes, and the learner's version does not move. Records of an older version (the
    overlapped loop) differ by the policy's own change too: they are not held to it."""
    from rlfleet.learner.step_metrics import LogprobMismatchError

    cfg = async_config(max_logprob_diff=0.5)
    prepared, own = single_update_batch(Learner(cfg, str(tiny_model_dir)), make_rollouts())
    close = dataclasses.replace(own, rollouts=behaviour_logprobs(prepared, shift=0.1).rollouts)
    _, metrics = gradients_of(cfg, tiny_model_dir, close, version=0)
    assert 0.01 < metrics["rollout/logprob_diff_same_version"] < 0.1
    learner = Learner(cfg, str(tiny_model_dir))
    far = dataclasses.replace(own, rollouts=behaviour_logprobs(prepared, shift=3.0).rollouts)
    with pytest.raises(LogprobMismatchError, match=r"past algorithm.max_logprob_diff=0.5.*rollout.dtype=float32"):
        learner.train_step(far)
    assert learner.version == 0
    _, stale = gradients_of(cfg, tiny_model_dir, far, version=1)  # version-0 records, learner at 1
    assert stale["rollout/logprob_diff_same_version"] is None


def test_the_mismatch_guard_reads_a_partial_rollout_token_by_token(tiny_model_dir):
    """`rollout.partial_rollout`: the tokens generated after a push are the learner's version's
    even though the record (as old as its oldest token) is not; the guard holds them to the limit."""
    from rlfleet.learner.step_metrics import LogprobMismatchError

    cfg = async_config(max_logprob_diff=0.5)
    prepared, own = single_update_batch(Learner(cfg, str(tiny_model_dir)), make_rollouts())
    far = behaviour_logprobs(prepared, shift=3.0).rollouts
    assert {r.policy_version for r in far} == {0}

    def pushed_halfway(r):
        half = len(r.response_ids) // 2
        return dataclasses.replace(r, token_versions=[0] * half + [1] * (len(r.response_ids) - half))

    with pytest.raises(LogprobMismatchError, match=r"past algorithm.max_logprob_diff=0.5"):
        gradients_of(cfg, tiny_model_dir, dataclasses.replace(own, rollouts=[pushed_halfway(r) for r in far]),
                     version=1)
    whole = [dataclasses.replace(r, token_versions=[0] * len(r.response_ids)) for r in far]
    _, metrics = gradients_of(cfg, tiny_model_dir, dataclasses.replace(own, rollouts=whole), version=1)
    assert metrics["rollout/logprob_diff_same_version"] is None


def test_rejected_sequences_get_no_loss_and_every_step_logs_the_correction(tiny_model_dir):
    """geo-RS (`algorithm.rollout_correction`) in the overlapped loop: the engine's log-probs of
    responses 0, 2 and 4 are 0.5 nats per token off π_prox, so their geometric-mean ratio leaves
    the 0.9–1.1 band and they are rejected. The update then equals one in which those responses
    get no loss at all (`mask_truncated` on them), group statistics unchanged; the step logs
    the off-policy and rejection metrics."""
    data = async_config(kl_in="none").model_dump()
    data["algorithm"]["rollout_correction"].update(rs_options="seq_mean_k1", rs_threshold="0.9_1.1")
    cfg = RunConfig.model_validate(data)
    assert needs_prepare(cfg)  # rejection needs the whole batch's old log-probs before the update
    prepared, _ = single_update_batch(Learner(cfg, str(tiny_model_dir)), make_rollouts())
    off = [dataclasses.replace(r, logprobs=[x + (0.5 if i % 2 == 0 else 0.0) for x in old])
           for i, (r, old) in enumerate(zip(prepared.rollouts, prepared.old_logprobs, strict=True))]
    exp = dataclasses.replace(prepared, rollouts=off)
    got, metrics = gradients_of(cfg, tiny_model_dir, exp, version=0)
    assert metrics["rollout_corr/rollout_rs_seq_masked_fraction"] == pytest.approx(0.5)
    assert metrics["rollout_corr/kl"] == pytest.approx(0.5 * sum(len(r.response_ids) for r in off[::2])
                                                       / sum(len(r.response_ids) for r in off), rel=1e-5)
    data["algorithm"]["rollout_correction"].update(rs_options=None, rs_threshold=None)
    data["algorithm"]["mask_truncated"] = True
    plain = RunConfig.model_validate(data)
    cut = [dataclasses.replace(r, finish_reason="length" if i % 2 == 0 else "stop") for i, r in enumerate(off)]
    want, _ = gradients_of(plain, tiny_model_dir, dataclasses.replace(exp, rollouts=cut), version=0)
    assert_same(got, want)

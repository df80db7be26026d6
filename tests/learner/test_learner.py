"""The Learner in-process (no Ray): micro-batching, skipped steps, stale data, LoRA, checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlfleet.common.config import RunConfig
from rlfleet.common.records import Experience, Rollout, SamplingSpec
from rlfleet.deploy.app.smoke import response_logprobs
from rlfleet.learner.learner import Learner, NonFiniteError, StaleRolloutError
from rlfleet.learner.models import full_tensor, merged_state_dict
from rlfleet.learner.step_data import reuses_update_logprobs, token_budget_batches
from rlfleet.weight_sync.object_store import OBJECT_STORE, object_store_chunks

pytestmark = pytest.mark.unit


def make_config(estimator: str = "gae", lora: bool = False, **learner) -> RunConfig:
    group = estimator != "gae"
    return RunConfig.model_validate({
        # fp32 stated: `auto` is bf16 autocast on a CPU with bf16 units (AVX-512 BF16, AMX)
        "model": {"dtype": "float32", "lora": {"enabled": lora, "rank": 4}},
        "rollout": {"prompts_per_step": 3, "samples_per_prompt": 2},
        "learner": {"minibatch_size": 3, "lr": 1e-3, "critic_lr": 1e-3, "ppo_epochs": 2, **learner},
        "algorithm": {
            "advantage_estimator": estimator,
            "kl_in": "loss" if group else "reward",
            "kl_estimator": "k3" if group else "k1",
            "kl_coef": 0.1,
            "entropy_coef": 0.01,
            "kl_target": None if group else 1.0,
        },
        "reference": {"colocate_with_learner": True},
    })


def make_rollouts(seed: int = 0, version: int = 0) -> list[Rollout]:
    """6 responses (3 prompts × 2) of different prompt and response lengths; one ended by EOS."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(6):
        prompt = torch.randint(4, 100, (4 + 2 * (i % 3),), generator=g).tolist()
        response = torch.randint(4, 100, (2 + i,), generator=g).tolist()
        finish = "stop" if i == 0 else "length"
        out.append(Rollout(i // 2, prompt, response, [-4.6] * len(response), finish, version))
    return out


def experience(learner: Learner, rollouts: list[Rollout], scores=(1.0, 0.0, 0.3, 0.9, 0.5, 0.5)) -> Experience:
    prepared = learner.prepare(rollouts)
    return Experience(rollouts, list(scores), [r.prompt_index for r in rollouts], prepared.old_logprobs,
                      prepared.values, prepared.ref_logprobs)


def single_update_config(**learner) -> RunConfig:
    """GRPO, one update per batch (one epoch, one minibatch of all 6 responses in several
    micro-batches), the reference its own actor: the old log-probs come from the update."""
    cfg = make_config("grpo", **{"minibatch_size": 6, "ppo_epochs": 1, "micro_batch_tokens": 40, **learner})
    return cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"colocate_with_learner": False})})


def single_update_batch(learner: Learner, rollouts: list[Rollout]) -> tuple[Experience, Experience]:
    """(with old log-probs from `prepare`, without them) and a reference 0.1-ish off the policy."""
    prepared = learner.prepare(rollouts)
    g = torch.Generator().manual_seed(1)
    ref = [(torch.tensor(row) + 0.1 * torch.randn(len(row), generator=g)).tolist() for row in prepared.old_logprobs]
    scores, groups = [1.0, 0.0, 0.3, 0.9, 0.5, 0.5], [r.prompt_index for r in rollouts]
    return (Experience(rollouts, scores, groups, prepared.old_logprobs, None, ref),
            Experience(rollouts, scores, groups, None, None, ref))


def all_parameters(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.policy.named_parameters()}


def test_token_budget_batches_fit_the_budget():
    lengths = [(4, 3), (6, 2), (2, 9), (3, 3), (30, 30)]
    batches = list(token_budget_batches(lengths, [0, 1, 2, 3, 4], budget=20))
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    for b in batches:
        width = max(lengths[i][0] for i in b) + max(lengths[i][1] for i in b)
        assert len(b) == 1 or len(b) * width <= 20
    assert [4] in batches  # a sequence over the budget still runs, alone


def record_gradients(learner: Learner) -> list[dict[str, torch.Tensor]]:
    """Capture every accumulated gradient (whole, on the CPU; gathered from the shards under
    FSDP) just before each optimizer step."""
    captured: list[dict[str, torch.Tensor]] = []
    step = learner._optimizer_step

    def recording(model, optimizer, scheduler, *rest):
        prefix = "critic." if model is learner.critic else "policy."
        captured.append({prefix + n: full_tensor(p.grad).cpu().clone()
                         for n, p in model.named_parameters() if p.grad is not None})
        return step(model, optimizer, scheduler, *rest)

    learner._optimizer_step = recording
    return captured


def start_recording_gradients(learner: Learner) -> None:
    """`record_gradients` inside a learner actor (`handle.__ray_call__`), kept on the learner."""
    learner.recorded_gradients = record_gradients(learner)


def recorded_gradients(learner: Learner) -> list[dict[str, torch.Tensor]]:
    return learner.recorded_gradients


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_same_gradients_as_one_pass(tiny_model_dir, agg):
    """Accumulating micro-batches (one sequence each) equals one pass over the minibatch; compared
    on the gradients, since Adam's first step amplifies rounding in near-zero gradients."""
    runs = []
    for budget in (10_000, 1):
        cfg = make_config(micro_batch_tokens=budget, minibatch_size=6, ppo_epochs=1)
        cfg = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"loss_agg": agg})})
        learner = Learner(cfg, str(tiny_model_dir))
        grads = record_gradients(learner)
        metrics = learner.train_step(experience(learner, make_rollouts())).metrics
        runs.append((grads, metrics))
    (one, m_one), (many, m_many) = runs
    assert len(one) == len(many) == 2  # one minibatch: the policy's and the critic's step
    for g_one, g_many in zip(one, many, strict=True):
        assert g_one.keys() == g_many.keys()
        for name in g_one:
            scale = g_one[name].abs().max().item()
            err = (g_many[name] - g_one[name]).abs().max().item()
            assert err <= 1e-5 * max(scale, 1e-3), (name, err, scale)
    assert m_many["loss/policy_avg"] == pytest.approx(m_one["loss/policy_avg"], abs=1e-6)
    assert m_many["loss/value_avg"] == pytest.approx(m_one["loss/value_avg"], abs=1e-6)


def test_every_trainable_parameter_changes_and_version_advances(tiny_model_dir):
    learner = Learner(make_config("gae"), str(tiny_model_dir))
    before = learner.parameter_snapshot()
    result = learner.train_step(experience(learner, make_rollouts()))
    after = learner.parameter_snapshot()
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == []
    assert result.version == learner.version == 1
    assert result.metrics["learner/skipped_steps"] == 0
    # The adaptive controller moved β after the step (KL was below the target of 1.0 → β shrinks).
    assert learner.kl_controller.value < 0.1
    # The over-optimisation guard's raise_kl: β × factor, used by the next step and checkpointed.
    beta = learner.kl_controller.value
    assert learner.scale_kl_coef(2.0) == pytest.approx(2 * beta)
    assert learner.train_step(experience(learner, make_rollouts(version=1))).metrics["learner/kl_coef"] == \
        pytest.approx(2 * beta)


@pytest.mark.parametrize("poison", ["score", "old_logprob"])
def test_non_finite_gradient_or_loss_skips_the_step_and_counts_it(tiny_model_dir, poison):
    learner = Learner(make_config("grpo", minibatch_size=6, ppo_epochs=1), str(tiny_model_dir))
    exp = experience(learner, make_rollouts())
    scores, old = list(exp.scores), [list(row) for row in exp.old_logprobs]
    if poison == "score":
        scores[2] = float("nan")  # group 1's advantages, hence gradients, become NaN
    else:
        old[2][1] = float("nan")  # the loss becomes NaN (the clamp's gradient there is 0)
    grads = record_gradients(learner)
    before = all_parameters(learner)
    result = learner.train_step(Experience(exp.rollouts, scores, exp.group_ids, old, None, exp.ref_logprobs))
    assert result.metrics["learner/skipped_steps"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in all_parameters(learner).items())
    if poison == "score":
        assert not all(torch.isfinite(g).all() for g in grads[0].values())
    # The next clean step trains again.
    clean = experience(learner, make_rollouts(version=1))
    assert learner.train_step(clean).metrics["learner/skipped_steps"] == 1.0
    assert not all(torch.equal(before[n], p) for n, p in all_parameters(learner).items())



def test_skips_in_a_row_stop_the_run_and_non_finite_weights_are_never_saved(tiny_model_dir, tmp_path):
    learner = Learner(make_config("grpo", minibatch_size=6, ppo_epochs=1, max_skips_in_a_row=2), str(tiny_model_dir))

    def poisoned(version: int) -> Experience:
        exp = experience(learner, make_rollouts(version=version))
        return Experience(exp.rollouts, [float("nan")] + list(exp.scores[1:]), exp.group_ids, exp.old_logprobs,
                          None, exp.ref_logprobs)

    learner.train_step(poisoned(0))  # one skip
    learner.train_step(experience(learner, make_rollouts(version=1)))  # a clean step resets the run
    learner.train_step(poisoned(2))
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row .*\(learner.max_skips_in_a_row=2\)"):
        learner.train_step(poisoned(3))
    assert learner.skipped_steps == 3
    with torch.no_grad():
        next(learner.policy.parameters())[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to save weights: model.embed_tokens.weight has non-finite"):
        learner.save(str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def test_rollouts_of_another_version_are_refused(tiny_model_dir):
    learner = Learner(make_config("grpo"), str(tiny_model_dir))
    with pytest.raises(StaleRolloutError, match=r"versions \[3\] reached a learner at version 0"):
        learner.prepare(make_rollouts(version=3))


def test_one_update_per_batch_makes_its_own_old_logprobs_exactly(tiny_model_dir):
    """Without `prepare`, the update's detached log-probs are the old ones: the same gradients,
    metrics and KL as with a separate no-grad pass. (Compared on the gradients: AdamW's first
    step turns a rounding-level difference in a near-zero gradient into an lr-sized one.)"""
    cfg = single_update_config()
    assert reuses_update_logprobs(cfg)
    with_old, without = Learner(cfg, str(tiny_model_dir)), Learner(cfg, str(tiny_model_dir))
    before = all_parameters(with_old)
    prepared, own = single_update_batch(with_old, make_rollouts())
    want_grads, got_grads = record_gradients(with_old), record_gradients(without)
    want, got = with_old.train_step(prepared).metrics, without.train_step(own).metrics
    (want_grads,), (got_grads,) = want_grads, got_grads
    after = all_parameters(with_old)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert want_grads.keys() == got_grads.keys() == {f"policy.{n}" for n in before}
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-7, rtol=1e-5, msg=name)
    assert got["objective/kl"] > 1e-3 and got["val/ratio"] == pytest.approx(1.0, abs=1e-7)
    for key, value in want.items():
        if value is not None:
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_missing_old_logprobs_are_refused_where_the_update_needs_them(tiny_model_dir):
    twice = make_config("grpo", minibatch_size=6, ppo_epochs=2)  # two epochs: the second needs the first's
    assert not reuses_update_logprobs(twice)
    _, own = single_update_batch(Learner(single_update_config(), str(tiny_model_dir)), make_rollouts())
    with pytest.raises(ValueError, match=r"old_logprobs is None.*call prepare\(\) first"):
        Learner(twice, str(tiny_model_dir)).train_step(own)
    stale = [dataclasses.replace(r, policy_version=3) for r in own.rollouts]
    with pytest.raises(StaleRolloutError, match="versions \\[3\\] reached a learner at version 0"):
        Learner(single_update_config(), str(tiny_model_dir)).train_step(dataclasses.replace(own, rollouts=stale))
    for change in ({"learner": {"minibatch_size": 3}}, {"algorithm": {"advantage_estimator": "gae"}},
                   {"algorithm": {"kl_in": "reward"}}, {"algorithm": {"tis_cap": 2.0}},
                   {"reference": {"colocate_with_learner": True}}):
        data = single_update_config().model_dump()
        for section, fields in change.items():
            data[section].update(fields)
        assert not reuses_update_logprobs(RunConfig.model_validate(data)), change


def test_old_logprobs_equal_a_plain_forward(tiny_model_dir, tiny_policy):
    learner = Learner(make_config("gae"), str(tiny_model_dir))
    rollouts = make_rollouts()
    prepared = learner.prepare(rollouts)
    for r, got in zip(rollouts, prepared.old_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), response_logprobs(tiny_policy, r), atol=1e-5, rtol=0)
    assert [len(v) for v in prepared.values] == [len(r.response_ids) for r in rollouts]


def test_lora_trains_only_the_adapter_and_the_reference_is_the_base(tiny_model_dir, tiny_policy):
    learner = Learner(make_config("grpo", lora=True), str(tiny_model_dir))
    before = all_parameters(learner)
    learner.train_step(experience(learner, make_rollouts()))
    after = all_parameters(learner)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora_names = {n for n in before if "lora_" in n}
    assert lora_names and changed == lora_names
    # Reference log-probs come from the same weights with the adapter disabled: the base model.
    rollouts = make_rollouts(seed=1, version=1)
    prepared = learner.prepare(rollouts)
    for r, ref, old in zip(rollouts, prepared.ref_logprobs, prepared.old_logprobs, strict=True):
        base = response_logprobs(tiny_policy, r)
        torch.testing.assert_close(torch.tensor(ref), base, atol=1e-5, rtol=0)
        assert (torch.tensor(old) - base).abs().max() > 1e-3  # the adapted policy differs
    # The published weights equal peft's own merge.
    merged = copy.deepcopy(learner.policy).merge_and_unload().state_dict()
    ours = merged_state_dict(learner.policy)
    assert ours.keys() == merged.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], merged[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.ray
@pytest.mark.vllm
def test_pushed_lora_weights_change_what_vllm_generates(ray_cluster, vllm_worker, tiny_model_dir, tiny_policy):
    learner = Learner(make_config("grpo", lora=True), str(tiny_model_dir))
    for _ in range(2):
        learner.train_step(experience(learner, make_rollouts(version=learner.version)))
    spec = SamplingSpec(n=1, max_tokens=6, temperature=1.0, seed=7)
    prompts = [r.prompt_ids for r in make_rollouts()[:4]]
    try:
        ray.get(vllm_worker.receive_weights.remote(OBJECT_STORE, learner.version, 0, *learner.weight_stream(OBJECT_STORE, "chunks")))
        batch = ray.get(vllm_worker.generate.remote(prompts, spec))
        adapted = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        adapted.load_state_dict(merged_state_dict(learner.policy))
        for r in batch.rollouts:
            assert r.policy_version == 2
            vllm_lp = torch.tensor(r.logprobs)
            torch.testing.assert_close(vllm_lp, response_logprobs(adapted, r), atol=1e-4, rtol=0)
            assert (vllm_lp - response_logprobs(tiny_policy, r)).abs().max() > 1e-3
    finally:  # the session's engine goes back to the initial weights
        ray.get(vllm_worker.receive_weights.remote(OBJECT_STORE, 0, 0, *object_store_chunks(tiny_policy.state_dict())))


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_saved_and_loaded_learner_continues_exactly(tiny_model_dir, tmp_path, estimator):
    cfg = make_config(estimator, lora=estimator == "grpo")
    first = Learner(cfg, str(tiny_model_dir))
    first.train_step(experience(first, make_rollouts()))
    first.save(str(tmp_path / "ckpt"))
    resumed = Learner(cfg, str(tiny_model_dir))
    assert resumed.load(str(tmp_path / "ckpt")) == 1
    step2 = [learner.train_step(experience(learner, make_rollouts(seed=2, version=1))) for learner in (first, resumed)]
    a, b = first.parameter_snapshot(), resumed.parameter_snapshot()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    for key, value in step2[0].metrics.items():
        if value is not None:
            assert step2[1].metrics[key] == pytest.approx(value, abs=1e-6), key
    assert resumed.kl_controller.value == first.kl_controller.value
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))  # no pickles


def test_the_learner_normalises_the_reward_models_score_and_checkpoints_the_statistics(tiny_model_dir, tmp_path):
    """The reward service is stateless: the learner folds each trained batch's raw model scores
    into the running statistics, trains on the normalised sum (a rule's component unchanged),
    and saves the statistics with its checkpoint; an older checkpoint's (written by the
    reward service into the run's state) is loaded when the learner's own has none."""
    cfg = make_config("grpo")
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"normalize": "running"})})
    raw, rule = [2.0, -1.0, 0.5, 3.0, 1.0, 1.5], [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    scores = [0.5 * m + r for m, r in zip(raw, rule, strict=True)]
    learner = Learner(cfg, str(tiny_model_dir))
    rollouts = make_rollouts()
    exp = dataclasses.replace(experience(learner, rollouts, scores), components={"model": raw, "rules[0]": rule},
                              weights={"model": 0.5, "rules[0]": 1.0})
    result = learner.train_step(exp)
    mean, std = sum(raw) / 6, torch.tensor(raw).std().item()
    trained = [0.5 * (m - mean) / std + r for m, r in zip(raw, rule, strict=True)]
    assert result.metrics["reward"] == pytest.approx(sum(trained) / 6, abs=1e-5)
    assert learner.rewards.state_dict()["count"] == 6 and learner.rewards.normalizer.mean == pytest.approx(mean)
    learner.save(str(tmp_path / "ckpt"))
    resumed = Learner(cfg, str(tiny_model_dir))
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.rewards.state_dict() == learner.rewards.state_dict()
    # a checkpoint from before the move: no statistics in learner.json, the reward service's in the run state
    folder = tmp_path / "ckpt" / "learner.json"
    state = json.loads(folder.read_text())
    del state["reward_normalizer"]
    folder.write_text(json.dumps(state))
    legacy = {"normalizer": {"mean": 1.25, "std": 2.0, "count": 40, "m2": 156.0}}
    older = Learner(cfg, str(tiny_model_dir))
    older.load(str(tmp_path / "ckpt"), legacy)
    assert older.rewards.state_dict() == legacy["normalizer"]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    runs = []
    for checkpointing in (False, True):
        cfg = make_config("gae", minibatch_size=6, ppo_epochs=1)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"gradient_checkpointing": checkpointing})})
        learner = Learner(cfg, str(tiny_model_dir))
        assert learner.policy.is_gradient_checkpointing == learner.critic.is_gradient_checkpointing == checkpointing
        grads = record_gradients(learner)
        learner.train_step(experience(learner, make_rollouts()))
        runs.append(grads)
    for plain, recomputed in zip(*runs, strict=True):
        for name in plain:
            torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_truncated_importance_sampling_scales_the_policy_gradient(tiny_model_dir):
    """vLLM's log-probs log 2 above the learner's: every token's weight is min(exp(-log 2), C) = ½."""
    grads = []
    for cap in (None, 4.0):
        cfg = make_config("grpo", minibatch_size=6, ppo_epochs=1)
        algo = cfg.algorithm.model_copy(update={"tis_cap": cap, "kl_coef": 0.0, "entropy_coef": 0.0})
        learner = Learner(cfg.model_copy(update={"algorithm": algo}), str(tiny_model_dir))
        exp = experience(learner, make_rollouts())
        shifted = [Rollout(r.prompt_index, r.prompt_ids, r.response_ids, [x + math.log(2) for x in old],
                           r.finish_reason, r.policy_version) for r, old in zip(exp.rollouts, exp.old_logprobs, strict=True)]
        grads.append(record_gradients(learner))
        learner.train_step(Experience(shifted, exp.scores, exp.group_ids, exp.old_logprobs, None, exp.ref_logprobs))
    plain, weighted = grads[0][0], grads[1][0]
    for name in plain:
        torch.testing.assert_close(weighted[name], 0.5 * plain[name], atol=1e-7, rtol=1e-4, msg=name)


def test_warmup_then_cosine_learning_rate(tiny_model_dir):
    cfg = make_config("grpo", minibatch_size=6, ppo_epochs=1, warmup_steps=2, schedule="cosine")
    cfg = cfg.model_copy(update={"total_steps": 6})  # 6 optimizer steps in all
    learner = Learner(cfg, str(tiny_model_dir))
    lrs = []
    for step in range(6):
        lrs.append(learner.scheduler.get_last_lr()[0])
        learner.train_step(experience(learner, make_rollouts(seed=step, version=learner.version)))
    expected = [1e-3 / 3, 2e-3 / 3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-9)

"""Reward and reference services as Ray actors on the shared local cluster."""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoModelForSequenceClassification

from rlfleet.common.config import ReferenceConfig, RewardConfig, RoleResources, RuleRewardConfig
from rlfleet.common.threads import ThreadBudget, node_cores
from rlfleet.common.tiny_models import build_tiny_reward_model
from rlfleet.deploy.assembly import start_reference_service, start_reward_service
from rlfleet.services.reference import ReferenceService
from rlfleet.services.reward_model import RewardModelScorer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm"), seed=5)


def test_reward_service_actor_scores_like_the_model(ray_cluster, rm_dir, tiny_model_dir, tiny_tokenizer):
    cfg = RewardConfig(model_path=str(rm_dir), model_weight=2.0,
                       rules=[RuleRewardConfig(function="rlfleet.services.rules:exact_match", weight=1.0)])
    svc = start_reward_service(cfg, str(tiny_model_dir), RoleResources(num_cpus=0))
    prompts = [tiny_tokenizer.encode(p) for p in ("1+1=", "2+3=", "10+10=")]
    responses = [tiny_tokenizer.encode(r) + [tiny_tokenizer.eos_token_id] for r in ("2", "6", "20")]
    extras = [{"answer": "2"}, {"answer": "5"}, {"answer": "20"}]
    batch = ray.get(svc.score.remote(prompts, responses, extras))
    direct = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        model_scores = [direct(torch.tensor([p + r])).logits[0, 0].item() for p, r in zip(prompts, responses, strict=True)]
    assert batch.components["model"] == pytest.approx(model_scores, abs=1e-5)
    assert batch.components["rules[0]"] == [1.0, 0.0, 1.0]
    assert batch.scores == pytest.approx([2 * m + c for m, c in zip(model_scores, [1.0, 0.0, 1.0], strict=True)], abs=1e-5)
    info = ray.get(svc.info.remote())
    assert info.parameters == sum(p.numel() for p in direct.parameters()) and info.dtype == "float32"
    assert ray.get(svc.health.remote()) is True
    ray.kill(svc)


def test_reference_service_actor_equals_in_process(ray_cluster, tiny_model_dir):
    """Also: the actor computes on its thread budget (the node's cores when it runs alone in its
    phase), not on the one thread Ray's num_cpus would give it."""
    ref = start_reference_service(str(tiny_model_dir), ReferenceConfig(micro_batch_size=2), RoleResources(num_cpus=0),
                                  threads=ThreadBudget())
    prompts, responses = [[20, 21, 22], [30], [40, 41]], [[50, 51], [52, 53, 54, 55], [56]]
    remote = ray.get(ref.logprobs.remote(prompts, responses))
    assert remote == ReferenceService(str(tiny_model_dir), micro_batch_size=2).logprobs(prompts, responses)
    info = ray.get(ref.info.remote())
    assert info.device == "cpu" and info.threads == node_cores()
    ray.kill(ref)
    one = start_reference_service(str(tiny_model_dir), ReferenceConfig(), RoleResources(num_cpus=0),
                                  threads=ThreadBudget(threads=1))
    assert ray.get(one.info.remote()).threads == 1
    ray.kill(one)


def test_bad_rule_fails_the_actor_at_startup_naming_the_field(ray_cluster, tiny_model_dir):
    cfg = RewardConfig(rules=[RuleRewardConfig(function="no_such_pkg.rewards:score")])
    svc = start_reward_service(cfg, str(tiny_model_dir), RoleResources(num_cpus=0))
    with pytest.raises(ray.exceptions.RayActorError, match=r"reward\.rules\[0\]\.function='no_such_pkg.rewards:score'"):
        ray.get(svc.health.remote())


def test_256_responses_are_scored_in_bounded_micro_batches(rm_dir):
    scorer = RewardModelScorer(str(rm_dir), micro_batch_size=16)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 100, (int(n),), generator=g).tolist() for n in torch.randint(8, 80, (256,), generator=g)]
    scores = scorer.score(seqs)
    assert len(scores) == 256 and scorer.batch_sizes == [16] * 16
    alone = RewardModelScorer(str(rm_dir), micro_batch_size=1).score(seqs[:8])
    assert scores[:8] == pytest.approx(alone, abs=1e-5)


def test_a_restarted_reward_service_scores_with_the_normaliser_state_it_had(ray_cluster, rm_dir, tiny_model_dir):
    """Running normalisation keeps statistics in the actor. Killed between two calls (Ray
    restarts it silently) or during one, the driver's next call brings the state it last saw,
    so the scores equal those of a service that never died. (`ray.kill` is asynchronous: the
    kill may land before, during or after the next call; every case must give these scores,
    which is why the state travels inside the score call.)"""
    from rlfleet.deploy.driver import Parts, call_service, reward_call

    cfg = RewardConfig(model_path=str(rm_dir), normalize="running")
    g = torch.Generator().manual_seed(9)
    seqs = [[torch.randint(4, 100, (n,), generator=g).tolist() for n in (3, 5, 2, 6)] for _ in range(3)]
    batches = [(b, [[7, 8]] * len(b), [{}] * len(b)) for b in seqs]
    steady = start_reward_service(cfg, str(tiny_model_dir), RoleResources(num_cpus=0))
    want = [ray.get(steady.score.remote(*b)).scores for b in batches]
    flaky = start_reward_service(cfg, str(tiny_model_dir), RoleResources(num_cpus=0), restarts=2)
    parts = Parts(None, None, flaky, None, str(tiny_model_dir), restarts=2)
    got = []
    for i, batch in enumerate(batches):
        if i:  # killed after every completed call; the next call meets a restarted actor
            ray.kill(flaky, no_restart=False)
        scored = call_service(parts, "reward", lambda b=batch: reward_call(parts, *b))
        got.append(scored.scores)
        parts.reward_state = scored.state
    for g_scores, w_scores in zip(got, want, strict=True):
        assert g_scores == pytest.approx(w_scores, abs=1e-6)
    # The statistics do matter: a fresh service (what a restart gives without the state)
    # scores the last batch differently.
    fresh = start_reward_service(cfg, str(tiny_model_dir), RoleResources(num_cpus=0))
    assert ray.get(fresh.score.remote(*batches[-1])).scores != pytest.approx(want[-1], abs=1e-3)
    ray.kill(fresh, no_restart=True)
    for handle in (steady, flaky):
        ray.kill(handle, no_restart=True)

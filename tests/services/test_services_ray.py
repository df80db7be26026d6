"""Reward and reference services as Ray actors on the shared local cluster."""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoModelForSequenceClassification

from rlfleet.common.config import ReferenceConfig, RewardConfig, RoleResources, RuleRewardConfig
from rlfleet.common.threads import ThreadBudget, node_cores
from rlfleet.common.tiny_models import build_tiny_reward_model
from rlfleet.deploy.actors.assembly import start_reference_service, start_reward_service
from rlfleet.services.client import ReferenceClient
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
    client = ReferenceClient(ref)  # the driver's path: the rows stay in the object store
    held = client.held(client.logprobs(prompts, responses, 1.0))
    assert held.rows == (0, 1, 2) and held.fetch(ray.get) == remote
    assert held.take([2, 0]).fetch(ray.get) == [remote[2], remote[0]]
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


def test_a_restarted_reward_service_scores_like_one_that_never_died(ray_cluster, rm_dir, tiny_model_dir):
    """The reward service is stateless (the learner owns the normalisation). Killed between two
    calls (Ray restarts it silently) or during one, the client makes the call again and gets
    the scores of a service that never died. (`ray.kill` is asynchronous: the kill may land
    before, during or after the next call; every case must give these scores.)"""
    from rlfleet.services.client import RewardClient

    cfg = RewardConfig(model_path=str(rm_dir), normalize="running")
    g = torch.Generator().manual_seed(9)
    seqs = [[torch.randint(4, 100, (n,), generator=g).tolist() for n in (3, 5, 2, 6)] for _ in range(3)]
    batches = [(b, [[7, 8]] * len(b), [{}] * len(b)) for b in seqs]
    steady = start_reward_service(cfg, str(tiny_model_dir), RoleResources(num_cpus=0))
    want = [ray.get(steady.score.remote(*b)).scores for b in batches]
    flaky = start_reward_service(cfg, str(tiny_model_dir), RoleResources(num_cpus=0), restarts=2)
    client = RewardClient(flaky, restarts=2)
    got = []
    for i, batch in enumerate(batches):
        if i:  # killed after every completed call; the next call meets a restarting actor
            ray.kill(flaky, no_restart=False)
        got.append(client.scores(client.score(*batch)).scores)
    for g_scores, w_scores in zip(got, want, strict=True):
        assert g_scores == pytest.approx(w_scores, abs=1e-6)
    assert client.retries <= 2
    for handle in (steady, flaky):
        ray.kill(handle, no_restart=True)

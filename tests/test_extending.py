"""The four recipes of docs/extending.md, each a module under tests/plugins/ that registers a
new implementation from outside the package, run through the part that uses it — with no
edit anywhere else: the config names it once its module is in `plugins`."""

from __future__ import annotations

import pytest
import ray
import torch

from rlfleet.common.config import RewardConfig, RoleResources, RunConfig
from rlfleet.common.records import SamplingSpec
from rlfleet.learner.learner import Learner
from rlfleet.services.reward_service import RewardService
from tests.learner.test_learner import experience, make_config, make_rollouts
from tests.rollout.publisher import Learner as PublisherGroup
from tests.rollout.publisher import Publisher
from tests.rollout.test_pool import PROMPTS, greedy_matches

PLUGINS = "tests.plugins"


@pytest.mark.unit
def test_an_unregistered_name_is_refused_until_its_plugin_is_listed():
    with pytest.raises(ValueError, match="unknown rollout backend 'nope'.*needs that module in `plugins`"):
        RunConfig.model_validate({"rollout": {"backend": "nope"}})
    with pytest.raises(ValueError, match=r"plugins\[0\]: 'tests.plugins.missing' could not be imported"):
        RunConfig.model_validate({"plugins": [f"{PLUGINS}.missing"]})
    cfg = RunConfig.model_validate({
        "plugins": [f"{PLUGINS}.{m}" for m in ("toy_estimator", "length_reward", "counting_backend", "whole_state_sync")],
        "algorithm": {"advantage_estimator": "batch_mean"}, "rollout": {"backend": "counting_hf",
                                                                       "weight_sync": "whole_state"},
        "reward": {"sources": [{"name": "length"}]}, "data": {"train_path": None},
    })
    assert (cfg.algorithm.advantage_estimator, cfg.rollout.backend, cfg.rollout.weight_sync) == \
        ("batch_mean", "counting_hf", "whole_state")


@pytest.mark.unit
def test_a_registered_estimator_runs_through_a_learner_step(tiny_model_dir):
    cfg = make_config("grpo")
    cfg = RunConfig.model_validate({**cfg.model_dump(), "plugins": [f"{PLUGINS}.toy_estimator"],
                                    "algorithm": {**cfg.algorithm.model_dump(), "advantage_estimator": "batch_mean"}})
    from tests.plugins.toy_estimator import SEEN

    learner = Learner(cfg, str(tiny_model_dir))
    before = learner.parameter_snapshot()
    SEEN.clear()
    result = learner.train_step(experience(learner, make_rollouts()))
    assert result.version == 1 and result.metrics["learner/skipped_steps"] == 0
    assert len(SEEN) == 1 and SEEN[0].tolist() == pytest.approx([1.0, 0.0, 0.3, 0.9, 0.5, 0.5])  # experience()'s
    assert any(not torch.equal(before[n], v) for n, v in learner.parameter_snapshot().items())


@pytest.mark.unit
def test_a_registered_reward_source_scores_through_the_reward_service(tiny_model_dir, tiny_tokenizer):
    config = RewardConfig(sources=[{"name": "length", "weight": 2.0, "kwargs": {"per_char": 0.25}}])
    service = RewardService(config, str(tiny_model_dir), plugins=[f"{PLUGINS}.length_reward"])
    prompts = [tiny_tokenizer.encode("1+1=")] * 3
    responses = [tiny_tokenizer.encode(text, add_special_tokens=False) for text in ("2", "22", "")]
    batch = service.score(prompts, responses)
    assert batch.components["length"][:2] == [0.25, 0.5]
    assert batch.scores[:2] == [0.5, 1.0]  # weight 2
    assert batch.scores[2] is None and batch.reasons[2] == "length:empty"


@pytest.mark.ray
def test_a_registered_backend_and_weight_sync_method_serve_a_pool_and_a_push(ray_cluster, tiny_model_dir,
                                                                            tiny_model_v1_dir):
    """The backend (HF generate that counts its calls) through the pool, then the pool's push
    by the new weight-sync method (the whole state in one object): the workers then generate
    exactly as the pushed model."""
    from rlfleet.deploy.actors.assembly import start_rollout_pool
    from rlfleet.weight_sync import WEIGHT_SYNC

    cfg = RunConfig.model_validate({"plugins": [f"{PLUGINS}.counting_backend", f"{PLUGINS}.whole_state_sync"],
                                    "rollout": {"backend": "counting_hf", "num_workers": 2,
                                                "weight_sync": "whole_state"}})
    pool = start_rollout_pool(str(tiny_model_dir), cfg.rollout, RoleResources(num_cpus=0))
    publisher = ray.remote(Publisher).options(num_cpus=0).remote(str(tiny_model_v1_dir))
    try:
        batch = pool.generate(PROMPTS, SamplingSpec(n=2, max_tokens=8))
        assert len(batch.rollouts) == 2 * len(PROMPTS)
        assert sum(ray.get([h.served.remote() for h in pool.handles()])) >= 1
        sync = WEIGHT_SYNC[cfg.rollout.weight_sync]
        assert pool.push_weights(sync.source(1, PublisherGroup(publisher), 1)) == [1, 1]
        pushed = ray.get(publisher.weight_call.remote(sync, "blob"))  # what was sent: the v1 model
        assert isinstance(pushed, bytes)
        from transformers import AutoModelForCausalLM

        v1 = AutoModelForCausalLM.from_pretrained(tiny_model_v1_dir, dtype=torch.float32).eval()
        assert all(greedy_matches(h, v1) for h in pool.handles())
    finally:
        pool.close()
        ray.kill(publisher)

"""Sleep/wake (colocated mode) and the NCCL broadcast push: GPU only."""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlfleet.common.config import RoleResources, RolloutConfig
from rlfleet.common.records import SamplingSpec
from rlfleet.deploy.actors.assembly import rollout_worker_factory
from rlfleet.deploy.app.smoke import response_logprobs

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_sleep_mode_refused_where_vllm_lacks_it(ray_cluster, tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("the platform has sleep mode")
    cfg = RolloutConfig(sleep_between_steps=True, max_restarts=0)
    worker = rollout_worker_factory(str(tiny_model_dir), cfg, RoleResources(num_cpus=0))()
    with pytest.raises(ray.exceptions.RayActorError, match="rollout.sleep_between_steps=true needs"):
        ray.get(worker.policy_version.remote())


@pytest.mark.gpu
def test_sleep_then_wake_keeps_weights(ray_cluster, tiny_model_dir):
    cfg = RolloutConfig(sleep_between_steps=True, gpu_memory_utilization=0.3)
    worker = rollout_worker_factory(str(tiny_model_dir), cfg, RoleResources(num_gpus=1))()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ray.get(worker.sleep.remote())
    batch = ray.get(worker.generate.remote(["12+7="], SamplingSpec(n=2, max_tokens=16)))
    for r in batch.rollouts:
        torch.testing.assert_close(torch.tensor(r.logprobs), response_logprobs(model, r), rtol=0, atol=1e-3)
    ray.kill(worker)


@pytest.mark.gpu
def test_nccl_broadcast_push_between_gpus(ray_cluster, tiny_model_dir, tiny_model_v1_dir):
    from rlfleet.weight_sync import BROADCAST
    from tests.rollout.publisher import Learner, Publisher

    if torch.cuda.device_count() < 2:
        pytest.skip("an NCCL push needs the sender and a receiver on different GPUs")
    publisher = ray.remote(Publisher).options(num_gpus=1).remote(str(tiny_model_dir), "cuda", 1 << 20)
    cfg = RolloutConfig(backend="hf")
    worker = rollout_worker_factory(str(tiny_model_v1_dir), cfg, RoleResources(num_gpus=1))()
    assert BROADCAST.source(1, Learner(publisher), 1).load_into([worker], timeout_s=300) == [1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = ray.get(worker.generate.remote(["12+7="], SamplingSpec(n=2, max_tokens=16)))
    for r in batch.rollouts:
        torch.testing.assert_close(torch.tensor(r.logprobs), response_logprobs(model, r), rtol=0, atol=1e-3)

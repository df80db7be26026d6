"""Weight pushes while a vLLM worker generates (`rollout/engine_loop.py`): with
`rollout.partial_rollout` a push lands between two engine steps and the requests continue,
token-exactly, under the new weights; without it, between two requests."""

from __future__ import annotations

import copy
import threading
import time
import types

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlfleet.common.config import RoleResources, RolloutConfig
from rlfleet.common.records import SamplingSpec
from rlfleet.deploy.actors.assembly import start_rollout_pool
from rlfleet.weight_sync.object_store import OBJECT_STORE, ObjectStoreWeights, object_store_chunks

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


def test_without_partial_rollouts_a_push_lands_between_requests_of_calls_sharing_the_engine(
        vllm_worker, tiny_model_v1_dir, tiny_policy, tiny_tokenizer):
    """A worker takes many calls at once (one per prompt group), all on one engine. A push
    that arrives while requests run waits until they finish (their records say v0), holds back
    calls that arrive meanwhile, and these run wholly on v1: every record is of one version,
    and its log-probs are that version's."""
    worker = vllm_worker  # the session's worker (default config), back on the initial weights after
    try:
        pushed = AutoModelForCausalLM.from_pretrained(tiny_model_v1_dir, dtype=torch.float32).eval()
        chunks = tuple(object_store_chunks(pushed.state_dict(), chunk_bytes=300_000))
        long = SamplingSpec(n=2, max_tokens=200, min_tokens=200, temperature=1.0, seed=3)
        first = [worker.generate.remote([p], long) for p in PROMPTS[:3]]  # three calls at once
        deadline = time.monotonic() + 120
        while not ray.get(worker.generating.remote()):
            assert time.monotonic() < deadline, "the worker never started generating"
            time.sleep(0.02)
        push = worker.receive_weights.remote(OBJECT_STORE, 1, 0, *chunks)
        time.sleep(0.2)  # the push is waiting for the running requests
        later = worker.generate.remote(PROMPTS[3:4], SamplingSpec(n=2, max_tokens=8, min_tokens=8, seed=4))
        assert ray.get(push) == 1
        calls = [b.rollouts for b in ray.get(first)] + [ray.get(later).rollouts]
        models = {0: tiny_policy, 1: pushed}
        versions = []
        for records in calls:
            assert len({r.policy_version for r in records}) == 1 and all(r.token_versions is None for r in records)
            versions.append(records[0].policy_version)
            for r in records:  # each token was sampled from its record's version
                want = logprobs_without_eos(models[r.policy_version], r, tiny_tokenizer.eos_token_id)
                assert torch.allclose(torch.tensor(r.logprobs), want, rtol=0, atol=1e-3)
        assert 0 in versions[:3] and versions[3] == 1  # a running call ended on v0; the later one is v1
    finally:
        ray.get(worker.receive_weights.remote(OBJECT_STORE, 0, 0, *object_store_chunks(tiny_policy.state_dict())))


class _Params:
    """The fields of vLLM's SamplingParams the engine loop reads."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.min_tokens, self.output_kind = max_tokens, 0, None

    def clone(self):
        return copy.copy(self)


class _StepEngine:
    """An engine for the loop's scheduling logic alone: each step gives every live request one
    token (its position in the request's response, from 1), after 5 ms."""

    def __init__(self):
        self.live: dict[str, list] = {}
        self.steps = 0
        self.added: list[tuple[int, int]] = []  # (prompt length, max_tokens) of every add

    def add_request(self, key, prompt, params):
        self.live[key] = [params.max_tokens, 0, len(prompt["prompt_token_ids"])]
        self.added.append((len(prompt["prompt_token_ids"]), params.max_tokens))

    def abort_request(self, keys):
        for key in keys:
            self.live.pop(key, None)

    def step(self):
        time.sleep(0.005)
        self.steps += 1
        outs = []
        for key, state in list(self.live.items()):
            state[1] += 1
            done = state[1] == state[0]
            token = state[1]
            comp = types.SimpleNamespace(token_ids=[token], logprobs=[{token: types.SimpleNamespace(logprob=-1.0)}],
                                         finish_reason="length")
            outs.append(types.SimpleNamespace(request_id=key, outputs=[comp], finished=done))
            if done:
                del self.live[key]
        return outs


@pytest.mark.unit
def test_the_engine_loop_batches_calls_together_and_runs_pushes_between_requests_or_steps():
    from rlfleet.rollout.engine_loop import EngineLoop

    def in_threads(*jobs):
        out = [None] * len(jobs)
        threads = [threading.Thread(target=lambda i=i, job=job: out.__setitem__(i, job())) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return out

    # two calls at once share the engine's steps
    engine = _StepEngine()
    loop = EngineLoop(engine, 0, deadline_s=10)
    a, b = in_threads(lambda: loop.generate([[1, 2]], [_Params(40)]), lambda: loop.generate([[3]], [_Params(40)]))
    assert len(a[0].ids) == len(b[0].ids) == 40 and engine.steps < 60
    # a push waits for the running requests; a call made meanwhile runs after it, on v1
    def late_call():
        time.sleep(0.05)
        return loop.generate([[5]], [_Params(3)])

    running, pushed, later = in_threads(lambda: loop.generate([[4]], [_Params(30)]),
                                        lambda: time.sleep(0.02) or loop.run(lambda: 1, "the push of v1"), late_call)
    assert running[0].versions == [0] * 30 and pushed == 1 and later[0].versions == [1] * 3
    # a call past its deadline fails naming it, its requests are dropped, and a push then lands
    slow = EngineLoop(_StepEngine(), 0, deadline_s=0.1)
    with pytest.raises(TimeoutError, match=r"waited 0.1 s for 1 requests on the engine"):
        slow.generate([[1]], [_Params(100)])  # ~0.5 s of steps
    assert slow.run(lambda: 6, "the push of v6") == 6
    # a push that cannot land within the deadline (a multi-turn call holds the engine) fails naming it
    with slow.pinned(), pytest.raises(TimeoutError, match=r"0.1 s for the engine to run the push of v7"):
        slow.run(lambda: 7, "the push of v7")
    time.sleep(0.05)
    assert slow.version == 6  # the push that timed out never runs late
    # partial rollouts: the push lands between two steps, the request continues from its tokens
    engine = _StepEngine()
    partial = EngineLoop(engine, 0, deadline_s=10, interrupt=True)
    cut, _ = in_threads(lambda: partial.generate([[9, 9]], [_Params(40)]),
                        lambda: time.sleep(0.05) or partial.run(lambda: 2, "the push of v2"))
    versions = cut[0].versions
    assert len(versions) == 40 and versions == sorted(versions) and versions[0] == 0 and versions[-1] == 2
    have = versions.count(0)
    assert engine.added == [(2, 40), (2 + have, 40 - have)]  # re-added: prompt + its tokens, for the rest
    for lp in (loop, slow, partial):
        lp.close()

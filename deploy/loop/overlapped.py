"""The overlapped loop (`rollout.max_staleness` = k ≥ 1): the fleet generates the batches of
steps t+1 … t+k while the learner scores and trains step t.

    step t:  queue generate(t+k) ─► wait for generate(t) ─► refuse records older than v−k
             ─► collect its scoring (reward ∥ reference ∥ prepare) ─► train, and meanwhile
             submit the scoring of generate(t+1) as soon as it is done ─► queue push(v+1)

One background thread owns the rollout pool (`ThreadedPool`) and runs its calls in the order
they were queued. So a push queued after generate(t+1) lands between that call and the next
one on every worker: requests already running finish on the old weights (their records say
so), later ones use the new weights, and the fleet never stops for the learner. With
`rollout.partial_rollout` the push is offered to the generate call running on the thread, which
hands it to the workers at once; they load it between two engine steps and continue the running
requests on it (`rollout/engine_loop.py`). Each record's staleness is the learner's version when it
trains on it minus the version of its oldest token; nothing older than k is trained on
(`rollout/refused_stale` counts what was refused).

Streaming (vLLM, single-turn): the pool hands each prompt group on as it comes back
(`RolloutPool.generate(on_group=...)`), and the driver's thread submits the scoring of the
groups back so far (reward ∥ reference ∥ prepare) while it waits for the batch or while the
learner trains, so a group's scoring starts about when the group is complete; the batch is
trained on the parts joined in its order (`scoring.Streamed`, `rollout/scoring_parts`).

Every wait on the thread has a deadline (a backstop over the pool's own per-call deadlines);
when it passes, the error names what was awaited. A queued push or rescale that failed is
raised at the next wait, never lost.

Checkpoints: the sampler position saved with step t is the one *before* the prompts of the
batches still in flight were drawn, so a resumed run draws them again: no prompt group is
trained twice or skipped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from rlfleet.common.config import RunConfig
from rlfleet.common.data import Example, PromptDataset, PromptSampler
from rlfleet.common.records import RolloutBatch
from rlfleet.deploy.actors.parts import Parts
from rlfleet.deploy.loop import episodes, stages
from rlfleet.deploy.loop.health import UnscorableLog
from rlfleet.deploy.loop.scoring import Scoring, Streamed, submit_scoring
from rlfleet.rollout.pool import RolloutPool
from rlfleet.weight_sync.base import WeightSource

logger = logging.getLogger(__name__)


class PipelineTimeout(TimeoutError):
    """A wait of the overlapped loop passed its deadline."""


class ThreadedPool:
    """A rollout pool driven from one background thread, with the pool's interface: `generate`
    and `versions` wait (with a deadline), `push_weights` and `scale_to` are queued and checked
    at the next wait, `generate_async` returns a future."""

    def __init__(self, pool: RolloutPool, deadline_s: float):
        self._pool = pool
        self._deadline_s = deadline_s
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="rlfleet-rollout")
        self._queued: deque[tuple[str, Future]] = deque()
        """Pushes and rescales not yet checked (bounded: `check` drops the done ones first)."""
        self._submitted: list[Future] = []

    def _submit(self, fn: Callable, *args) -> Future:
        self._submitted = [f for f in self._submitted if not f.done()]
        future = self._thread.submit(fn, *args)
        self._submitted.append(future)
        return future

    @property
    def num_workers(self) -> int:
        return self._pool.num_workers

    @property
    def num_down(self) -> int:
        return self._pool.num_down

    @property
    def stats(self):
        return self._pool.stats

    @property
    def streaming(self) -> bool:
        return self._pool.streaming

    def handles(self) -> list[Any]:
        return self._pool.handles()

    def generate_async(self, call: Callable[[RolloutPool], RolloutBatch]) -> Future:
        """Run `call(pool)` (a generate or run_episodes call) on the rollout thread."""
        return self._submit(call, self._pool)

    def generate(self, prompts, spec) -> RolloutBatch:
        return self.wait(self.generate_async(lambda pool: pool.generate(prompts, spec)),
                         f"a generate call of {len(prompts)} prompts")

    def run_episodes(self, examples, spec) -> RolloutBatch:
        return self.wait(self.generate_async(lambda pool: pool.run_episodes(examples, spec)),
                         f"a run_episodes call of {len(examples)} examples")

    def versions(self) -> list[int]:
        return self.wait(self._submit(self._pool.versions), "the rollout workers' versions")

    def push_weights(self, source: WeightSource) -> None:
        if self._pool.interruptible:  # partial_rollout: the running generate call takes it mid-call
            self._pool.offer_push(source)
            self._later(f"the push of policy v{source.version}", self._pool.push_offered)
            return
        self._later(f"the push of policy v{source.version}", self._pool.push_weights, source)

    def scale_to(self, k: int) -> None:
        self._later(f"scaling the rollout fleet to {k} workers", self._pool.scale_to, k)

    def sleep(self) -> None:
        self.wait(self._submit(self._pool.sleep), "putting the rollout workers to sleep")

    def wake_up(self) -> None:
        self.wait(self._submit(self._pool.wake_up), "waking the rollout workers")

    def _later(self, what: str, fn: Callable, *args) -> None:
        self.check()
        self._queued.append((what, self._submit(fn, *args)))

    def check(self) -> None:
        """Raise the error of a queued push or rescale that failed (forget those that are done)."""
        while self._queued and self._queued[0][1].done():
            what, future = self._queued.popleft()
            error = future.exception()
            if error is not None:
                raise RuntimeError(f"{what} failed: {error}") from error

    def wait(self, future: Future, what: str, while_waiting: Callable[[], None] | None = None) -> Any:
        """`future`'s result within the deadline; else PipelineTimeout naming `what`.
        `while_waiting()` runs every 10 ms until it is done."""
        deadline = time.monotonic() + self._deadline_s
        try:
            if while_waiting is not None:
                while not future.done() and time.monotonic() < deadline:
                    while_waiting()
                    wait_futures([future], timeout=0.01)
            result = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout as err:
            raise PipelineTimeout(
                f"waited {self._deadline_s:g} s for {what} on the rollout thread "
                f"(queued before it: {[w for w, f in self._queued if not f.done()] or 'nothing'})"
            ) from err
        self.check()
        return result

    def close(self, stop_workers: bool = True) -> None:
        """Drop queued calls, let the running one end (up to a minute), stop the workers."""
        self._thread.shutdown(wait=False, cancel_futures=True)
        for future in [f for f in self._submitted if f.running()]:
            try:
                future.exception(timeout=min(self._deadline_s, 60.0))
            except FutureTimeout:
                logger.warning("a rollout call was still running at shutdown; stopping the workers under it")
        if stop_workers:
            self._pool.close()


@dataclass
class _InFlight:
    index: int
    """The batch's number (its sampling seeds): steps, then each step's extra batches, in order."""
    examples: list[Example]
    future: Future
    position: dict
    """The sampler's state before this batch's prompts were drawn."""
    queued_at_version: int
    scoring: Scoring | None = None
    """Its reward / reference / old-log-prob calls, once submitted (while the learner trained)."""
    done_groups: deque = field(default_factory=deque)
    """Streaming: (first prompt index, records) of each call back from the fleet, not yet scored
    (appended on the rollout thread, taken on the driver's)."""
    streamed: list[Scoring] = field(default_factory=list)
    """Streaming: the scoring calls submitted for its groups so far."""


class Overlapped:
    """Steps of the overlapped loop; generation for up to k later steps is always in flight.
    It drives the fleet from its own thread: `parts.pool` becomes a `ThreadedPool` (after
    resume, whose push is synchronous)."""

    def __init__(self, cfg: RunConfig, parts: Parts, data: PromptDataset, sampler: PromptSampler,
                 unscorable: UnscorableLog, version: int):
        parts.pool = ThreadedPool(parts.pool, pipeline_deadline_s(cfg))
        self._cfg, self._parts, self._data, self._sampler = cfg, parts, data, sampler
        self._unscorable = unscorable
        self._pool: ThreadedPool = parts.pool
        self._ahead: deque[_InFlight] = deque()
        self._next_index: int | None = None
        self.version = version
        """The learner's version (the weights the next update starts from)."""
        self.refused = 0
        self._streaming = parts.pool.streaming and not cfg.environment.enabled
        """Each group's scoring starts when the fleet hands it back (vLLM, single-turn)."""
        self.streamed_parts = 0
        """Scoring calls submitted group-wise so far (a metric: how finely scoring streamed)."""

    def position(self) -> dict:
        """The sampler state to checkpoint: before the prompts of the batches still in flight."""
        return self._ahead[0].position if self._ahead else self._sampler.state_dict()

    def _fill(self, n: int) -> None:
        """Keep `n` batches in flight (drawn in order, so a checkpoint's position is exact)."""
        while len(self._ahead) < n:
            position = self._sampler.state_dict()
            examples = stages.draw(self._cfg, self._data, self._sampler)
            spec = stages.sampling_spec(self._cfg, self._next_index)
            done: deque = deque()
            on_group = (lambda start, part, d=done: d.append((start, part))) if self._streaming else None
            future = self._pool.generate_async(
                lambda pool, ex=examples, sp=spec, og=on_group: episodes.generate(self._cfg, pool, ex, sp, og))
            self._ahead.append(_InFlight(self._next_index, examples, future, position, self.version, done_groups=done))
            self._next_index += 1

    def _score_groups(self, batch: _InFlight) -> None:
        """Streaming: submit the scoring of the groups the fleet sent back since the last look
        (one call per service for all of them), on the driver's thread: every learner call is
        made from this thread, so data-parallel ranks see them in one order."""
        taken = []
        while batch.done_groups:
            taken.append(batch.done_groups.popleft())
        rollouts = [replace(r, prompt_index=r.prompt_index + start) for start, part in taken for r in part.rollouts]
        if rollouts:
            batch.streamed.append(submit_scoring(self._cfg, self._parts, rollouts, batch.examples))

    def _take(self, what: str) -> stages.Generated:
        """The oldest batch in flight, once generated, without records past the bound."""
        mine = self._ahead.popleft()
        score_groups = (lambda: self._score_groups(mine)) if self._streaming else None
        batch = self._pool.wait(mine.future, f"{what} (batch {mine.index}, queued at policy v{mine.queued_at_version})",
                                score_groups)
        if self._streaming:
            self._score_groups(mine)  # the last groups
            rows = Streamed.rows_of(mine.streamed, batch.rollouts)
        generated = len(batch.rollouts)
        batch, kept = self._fresh(batch)
        if self._streaming:  # the groups' scoring, without the records refused
            self.streamed_parts += len(mine.streamed)
            return stages.Generated(mine.examples, batch, Streamed(mine.streamed, [rows[i] for i in kept]))
        # scored early: only the batch as generated
        return stages.Generated(mine.examples, batch, mine.scoring if len(kept) == generated else None)

    def step(self, step: int) -> dict[str, Any]:
        cfg, parts, k = self._cfg, self._parts, self._cfg.rollout.max_staleness
        timer, began = stages.PhaseTimer(), time.perf_counter()
        if self._next_index is None:
            self._next_index = step
        refused_before, parts_before = self.refused, self.streamed_parts
        self._fill(k + 1)
        with timer("generate"):  # the wait: the engines' own time is timing/generate_busy
            generated = self._take(f"the rollouts of step {step}")
        sb, metrics = stages.score(cfg, parts, generated, timer, self._extra_batches(step))
        batch_metrics, exp = stages.experience(cfg, parts, sb, timer, self._unscorable, version=self.version)
        metrics.update(batch_metrics)
        metrics.update({
            "rollout/refused_stale": float(self.refused - refused_before),
            # streaming: scoring calls this step's batches were scored in (1: the whole batch at once)
            "rollout/scoring_parts": float(self.streamed_parts - parts_before),
            # partial_rollout: records whose tokens span a push (generated by two versions)
            "rollout/interrupted": float(sum(1 for r in generated.batch.rollouts
                                             if r.token_versions and r.token_versions[0] != r.token_versions[-1])),
            "rollout/num_workers": float(self._pool.num_workers),
        })
        if exp is None:
            return stages.step_metrics(metrics, None, timer, began)
        with timer("train"):
            pending = stages.submit_train(cfg, parts, exp)
            self._score_next(pending)  # the next batch's scoring, off the learner's path
            result = stages.trained(pending)
        with timer("push"):  # publish and queue: the workers load it after the calls queued before
            stages.push_weights(cfg, parts, result.version)
        self.version = result.version
        return stages.step_metrics(metrics, result, timer, began)

    def _extra_batches(self, step: int) -> Iterator[stages.Generated]:
        """Dynamic sampling's further batches of this step: the next in flight, another queued
        behind it as each is taken."""
        k = self._cfg.rollout.max_staleness
        while True:
            self._fill(1)
            extra = self._take(f"an extra batch of step {step}")
            self._fill(k)
            yield extra

    def _score_next(self, training: list) -> None:
        """While the learner trains: submit the next batch's scoring as soon as the fleet has
        generated it (on the cores the fleet and the services share), so that it is off the
        learner's path. Returns when it is submitted or the learner is done."""
        if not self._ahead:
            return
        nxt = self._ahead[0]
        while True:
            if self._streaming:
                self._score_groups(nxt)
            if nxt.future.done():
                if nxt.future.exception() is None and not self._streaming:
                    batch = nxt.future.result()
                    nxt.scoring = submit_scoring(self._cfg, self._parts, batch.rollouts, nxt.examples)
                elif nxt.future.exception() is None:
                    self._score_groups(nxt)
                return
            ready, _ = ray.wait(training, num_returns=len(training), timeout=0.005)
            if len(ready) == len(training):
                return

    def _fresh(self, batch: RolloutBatch) -> tuple[RolloutBatch, list[int]]:
        """Drop (and count) the records older than the bound (a group shares its worker call,
        so whole groups go); the indices of those kept."""
        oldest = self.version - self._cfg.rollout.max_staleness
        kept = [i for i, r in enumerate(batch.rollouts) if r.policy_version >= oldest]
        keep = [batch.rollouts[i] for i in kept]
        refused = len(batch.rollouts) - len(keep)
        if refused:
            self.refused += refused
            logger.warning("refused %d records older than policy v%d (rollout.max_staleness=%d)",
                           refused, oldest, self._cfg.rollout.max_staleness)
        return replace(batch, rollouts=keep), kept


def pipeline_deadline_s(cfg: RunConfig) -> float:
    """The backstop over one wait on the rollout thread: every call queued before it (k + 2:
    the batches ahead, a push, the awaited one) at its worst (all redispatches spent)."""
    r = cfg.rollout
    return (r.max_staleness + 2) * r.generate_timeout_s * (r.max_redispatch + 2)

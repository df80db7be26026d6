"""The training loop: one phase per line.

    sample prompts → rollout pool → (reward ∥ reference ∥ learner.prepare) → learner.train_step
    → push weights (every worker must report the new version) → metrics → checkpoint → eval

The per-token rows (old log-probs, values, reference log-probs) stay in Ray's object store
from the actor that computed them to the learner that trains on them (`Held`); the driver
handles scores, rollouts and row selections. Reward and reference calls go through one typed
client each (`services/client.py`: restart-and-retry); the services are stateless.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from rlfleet.common.config import RoleResources, RunConfig
from rlfleet.common.data import Example, PromptDataset, PromptSampler
from rlfleet.common.records import (
    Experience,
    Held,
    Rollout,
    RolloutBatch,
    SamplingSpec,
    ScoreBatch,
    StepResult,
)
from rlfleet.deploy import episodes
from rlfleet.deploy.baselines import greedy_baselines
from rlfleet.deploy.groups import ScoredBatch, choose_groups, informative_groups, join, merge
from rlfleet.deploy.health import UnscorableLog
from rlfleet.deploy.learner_group import LearnerGroup
from rlfleet.learner.objective import estimator_info
from rlfleet.learner.step_data import needs_prepare
from rlfleet.rollout.pool import RolloutPool
from rlfleet.services.client import Call, ReferenceClient, RewardClient
from rlfleet.services.reward_service import drop_unscorable
from rlfleet.weight_sync import WEIGHT_SYNC

logger = logging.getLogger(__name__)


@dataclass
class Parts:
    """The running actors of a run (Ray handles) and the pool that drives the rollout workers."""

    learner: LearnerGroup
    pool: RolloutPool
    reward: RewardClient | None
    """None in an environment run: the episodes carry their rewards."""
    reference: ReferenceClient | None
    tokenizer_path: str
    gold: bool = False
    """The reward service holds a gold checker (`data.eval_reward` or the task's own rule)."""
    env_hosts: list = field(default_factory=list)
    """The environment hosts of a multi-turn run (the rollout workers play episodes on them)."""
    unscorable: UnscorableLog = field(default_factory=UnscorableLog)
    """Why responses were unscorable, per source (`deploy/health.py`)."""

    @property
    def service_retries(self) -> int:
        """Reward and reference calls made again because their actor died."""
        return sum(c.retries for c in (self.reward, self.reference) if c is not None)


@dataclass
class PhaseTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


def sampling_spec(cfg: RunConfig, step: int, greedy: bool = False) -> SamplingSpec:
    """Step k's sampling: seeded by (seed, step), so a resumed run samples what it would have."""
    r = cfg.rollout
    return SamplingSpec(
        n=1 if greedy else r.samples_per_prompt,
        max_tokens=r.max_response_tokens,
        temperature=0.0 if greedy else r.temperature,
        top_p=1.0 if greedy else r.top_p,
        top_k=-1 if greedy else r.top_k,
        stop=tuple(r.stop),
        seed=(cfg.seed * 1_000_003 + step) * 65_536,
    )


def extra_spec(cfg: RunConfig, step: int, i: int) -> SamplingSpec:
    """The sampling of step `step`'s `i`-th extra batch (dynamic sampling): its own seeds."""
    spec = sampling_spec(cfg, step)
    return replace(spec, seed=spec.seed + 32_768 * i)


def apply_control(cfg: RunConfig, parts: Parts, control: Any, done: int) -> None:
    """Between steps: report progress to the run's control actor and apply a pending request
    (rollout workers: new ones get the current weights before they generate)."""
    want = ray.get(control.take.remote(done, parts.pool.num_workers))
    have = parts.pool.num_workers
    if want is None or want == have:
        return
    missing = missing_resources(cfg.cluster.rollout, want - have)
    if missing:
        logger.warning("not scaling the rollout fleet to %d workers: the cluster lacks %s", want, missing)
        return
    parts.pool.scale_to(want)
    logger.info("after step %d: rollout workers %d -> %d", done, have, want)


def missing_resources(res: RoleResources, extra: int) -> str:
    """'' when `extra` more actors of `res` fit in the cluster's free resources, else what lacks."""
    if extra <= 0:
        return ""
    free = ray.available_resources()
    need = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
    short = [f"{name} {amount * extra:g} (free {free.get(name, 0.0):g})"
             for name, amount in need.items() if amount and free.get(name, 0.0) < amount * extra - 1e-9]
    return ", ".join(short)


def push_weights(cfg: RunConfig, parts: Parts, version: int) -> list[int] | None:
    """Hand the learner's current weights to every rollout worker as `version` (the
    overlapped loop: queued behind the generate calls already submitted); the versions the
    workers report after it (None when queued)."""
    try:
        sync = WEIGHT_SYNC[cfg.rollout.weight_sync]
        return parts.pool.push_weights(sync.source(version, parts.learner, cfg.rollout.tensor_parallel_size))
    except ray.exceptions.RayActorError as err:
        raise RuntimeError(f"the push of policy v{version} failed: an actor died ({err}); the last "
                           "checkpoint is untouched, and `rlfleet train` resumes from it") from err


def draw(cfg: RunConfig, data: PromptDataset, sampler: PromptSampler) -> list[Example]:
    """The next step's prompts."""
    return [data.examples[i] for i in sampler.next_batch(cfg.rollout.prompts_per_step)]


def train_step(cfg: RunConfig, parts: Parts, data: PromptDataset, sampler: PromptSampler, step: int) -> dict:
    """One synchronous step: generate, score, train, push (every worker reports the new version)."""
    timer = PhaseTimer()
    began = time.perf_counter()
    examples = draw(cfg, data, sampler)
    with timer("generate"):
        batch = episodes.generate(cfg, parts.pool, examples, sampling_spec(cfg, step))
    extra = itertools.count(1)

    def more():  # dynamic sampling: the next prompts, generated now
        drawn = draw(cfg, data, sampler)
        return drawn, episodes.generate(cfg, parts.pool, drawn, extra_spec(cfg, step, next(extra))), None

    metrics, result = learn(cfg, parts, examples, batch, timer, more=more)
    if result is None:
        return {**metrics, **timer.metrics(), "timing/step": time.perf_counter() - began}
    with timer("push"):
        if cfg.rollout.sleep_between_steps:  # colocated: the engines slept through the learner's phase
            parts.pool.wake_up()
        versions = push_weights(cfg, parts, result.version)
    metrics.update({"rollout/min_version": float(min(versions)), "rollout/max_version": float(max(versions)),
                    "rollout/num_workers": float(len(versions))})
    return {**result.metrics, **metrics, **timer.metrics(), "timing/step": time.perf_counter() - began}


More = Callable[[], "tuple[list[Example], RolloutBatch, Scoring | None]"]
"""Another batch for the same step (dynamic sampling): its prompts, rollouts and scoring if submitted."""


def learn(cfg: RunConfig, parts: Parts, examples: list[Example], batch: RolloutBatch, timer: PhaseTimer,
          scoring: Scoring | None = None, while_training: Callable[[list], None] | None = None,
          more: More | None = None, version: int | None = None) -> tuple[dict[str, Any], StepResult | None]:
    """Score a generated batch (reward ∥ reference ∥ old log-probs; `scoring`: already
    submitted) and train on it: the metrics of the batch, and the learner's result (None: every
    group was unscorable). With `algorithm.filter_groups`, batches from `more()` are added until
    the step has `rollout.prompts_per_step` informative groups. `while_training(refs)` runs
    while the learner trains. `version`: the learner's, to report the trained records' staleness."""
    with timer("score"):
        sb = _scored(cfg, parts, examples, batch, scoring, timer)
    extra = filtered = 0
    if cfg.algorithm.filter_groups:
        wanted = cfg.rollout.prompts_per_step
        with timer("extra_batches"):
            while (more is not None and extra < cfg.algorithm.max_extra_batches
                   and len(informative_groups(sb.scored.scores, [r.prompt_index for r in sb.rollouts])) < wanted):
                sb = merge(sb, _scored(cfg, parts, *more(), timer))
                extra += 1
        sb, filtered = choose_groups(sb, wanted)
    rollouts, scored = sb.rollouts, sb.scored
    group_ids = [r.prompt_index for r in rollouts]
    keep = drop_unscorable(scored, group_ids, cfg.reward.on_unscorable, cfg.reward.max_failures)
    per_group = Counter(group_ids)
    stats = parts.pool.stats
    metrics: dict[str, Any] = {
        "rollout/num_samples": float(len(rollouts)),
        "rollout/complete_groups": float(sum(n == cfg.rollout.samples_per_prompt for n in per_group.values())),
        # the pool's fault counters, cumulative over the run
        "rollout/redispatched": float(stats.redispatched),
        "rollout/recovered": float(stats.recovered),
        "rollout/replaced": float(stats.replaced),
        "rollout/resynced": float(stats.resynced),
        "rollout/timeouts": float(stats.timeouts),
        "rollout/dropped_prompts": float(sb.dropped),
        "reward/unscorable": float(len(keep) - sum(keep)),
        "rollout/tokens_per_s": sb.num_tokens / max(sb.generate_seconds, 1e-9),
        "timing/generate_busy": sb.generate_seconds,  # the engines' own time (the longest call of each batch)
        "rollout/policy_version": float(rollouts[0].policy_version) if rollouts else 0.0,
    }
    if version is not None:
        staleness = [version - r.policy_version for r in rollouts]
        metrics.update({"rollout/staleness_mean": sum(staleness) / max(len(staleness), 1),
                        "rollout/staleness_max": float(max(staleness, default=0))})
    if cfg.algorithm.filter_groups:
        metrics.update({"rollout/extra_batches": float(extra), "rollout/filtered_groups": float(filtered)})
    metrics.update(episodes.episode_metrics(rollouts))
    metrics.update(parts.unscorable.see(scored))
    if not any(keep):
        logger.warning("every group of this step was dropped (unscorable); no update")
        return {**metrics, "learner/updated": 0.0}, None
    rows = [i for i, k in enumerate(keep) if k]
    take = lambda held: None if held is None else held.take(rows)  # noqa: E731
    baselines = None
    if estimator_info(cfg.algorithm).needs_baselines:
        with timer("baselines"):
            baselines, missing = greedy_baselines(parts, sb.examples, rollouts, sampling_spec(cfg, 0, greedy=True))
        metrics["reward/baseline_unscorable"] = float(missing)
    exp = Experience(
        rollouts=_pick(rollouts, keep),
        scores=_pick(scored.scores, keep),
        group_ids=_pick(group_ids, keep),
        old_logprobs=take(sb.old_logprobs),
        values=take(sb.values),
        ref_logprobs=take(sb.ref),
        components={name: _pick(values, keep) for name, values in scored.components.items()},
        weights=dict(scored.weights),
        baselines=_pick(baselines, keep),
    )
    if cfg.rollout.sleep_between_steps:  # colocated: the engines free their memory for the learner
        with timer("sleep"):
            parts.pool.sleep()
    with timer("train"):
        pending = parts.learner.submit_train(exp)
        if while_training is not None:
            while_training(pending)
        result = ray.get(pending)[0]
    metrics["services/retries"] = float(parts.service_retries)
    metrics["learner/updated"] = 1.0
    return metrics, result


def _scored(cfg: RunConfig, parts: Parts, examples: list[Example], batch: RolloutBatch,
            scoring: Scoring | Streamed | None, timer: PhaseTimer) -> ScoredBatch:
    if isinstance(scoring, Streamed):
        scored, (old, values, ref) = collect_streamed(parts, scoring, timer)
    else:
        scoring = scoring or submit_scoring(cfg, parts, batch.rollouts, examples)
        scored, (old, values, ref) = collect_scoring(parts, scoring, timer)
    return ScoredBatch(examples, batch.rollouts, scored, old, values, ref, batch.generate_seconds,
                       batch.num_tokens, len(batch.dropped))


@dataclass
class Scoring:
    """A batch's reward, reference and old-log-prob calls in flight (submitted together)."""

    rollouts: list[Rollout]
    score: Call | ScoreBatch
    """The reward call, or the episodes' own rewards (an environment run)."""
    reference: Call | None
    pending: list
    """`LearnerGroup.submit_prepare`'s calls (none when the update makes its own old log-probs)."""
    submitted: float


@dataclass
class Streamed:
    """A batch's scoring submitted part by part as the fleet completed its groups (the
    overlapped loop): each part scores the records of some groups, in its own order."""

    parts: list[Scoring]
    order: list[int]
    """For each record of the batch as trained, its row among the parts' records (joined)."""

    @staticmethod
    def rows_of(parts: list[Scoring], rollouts: list[Rollout]) -> list[int]:
        """Each record's row among the parts' records (a group's records in the same order)."""
        where: dict[int, list[int]] = {}
        for row, r in enumerate(r for s in parts for r in s.rollouts):
            where.setdefault(r.prompt_index, []).append(row)
        seen: Counter = Counter()
        out = []
        for r in rollouts:
            out.append(where[r.prompt_index][seen[r.prompt_index]])
            seen[r.prompt_index] += 1
        return out


def collect_streamed(parts: Parts, s: Streamed, timer: PhaseTimer) -> tuple[ScoreBatch, tuple[Held | None, ...]]:
    """The parts' results joined in the batch's order; `timer` gets each call's longest latency."""
    collected = []
    for part in s.parts:
        own = PhaseTimer()
        collected.append(collect_scoring(parts, part, own))
        for name, seconds in own.seconds.items():
            timer.seconds[name] = max(timer.seconds.get(name, 0.0), seconds)
    return join(collected, s.order)


def submit_scoring(cfg: RunConfig, parts: Parts, rollouts: list[Rollout], examples: list[Example]) -> Scoring:
    """Reward, reference and old log-probs as three concurrent actor calls (no old log-probs
    when the update makes its own or takes the engine's: `needs_prepare`)."""
    prompts = [r.prompt_ids for r in rollouts]
    responses = [r.response_ids for r in rollouts]
    submitted = time.perf_counter()
    if cfg.environment.enabled:  # the environment's rewards, carried by the episodes
        score: Call | ScoreBatch = episodes.episode_scores(rollouts)
    else:
        score = parts.reward.score(prompts, responses, [examples[r.prompt_index].extra for r in rollouts])
    reference = None
    if parts.reference is not None:
        reference = parts.reference.logprobs(prompts, responses, cfg.rollout.temperature)
    pending = parts.learner.submit_prepare(rollouts) if needs_prepare(cfg) else []
    return Scoring(rollouts, score, reference, pending, submitted)


def collect_scoring(parts: Parts, s: Scoring, timer: PhaseTimer) -> tuple[ScoreBatch, tuple[Held | None, ...]]:
    """The scores of `submit_scoring` (a dead service's call re-made by its client) and the
    old log-probs, values and reference log-probs left in the object store (None: not
    computed); `timer` gets the latency of each call (`reward`, `reference`, `old_logprobs`:
    submission to result; they overlap)."""
    in_flight = {}
    if isinstance(s.score, Call):
        in_flight["reward"] = [s.score.ready]
    if s.pending:
        in_flight["old_logprobs"] = [r for _, r in s.pending]
    if s.reference is not None:
        in_flight["reference"] = [s.reference.ready]
    for name, seconds in _latencies(in_flight, s.submitted).items():
        timer.add(name, seconds)
    old = values = ref = None
    if s.pending:
        old, values, ref = parts.learner.held(s.pending)
    if s.reference is not None:
        ref = parts.reference.held(s.reference)
    scored = parts.reward.scores(s.score) if isinstance(s.score, Call) else s.score
    return scored, (old, values, ref)


def _latencies(in_flight: dict[str, list[ray.ObjectRef]], since: float) -> dict[str, float]:
    """Seconds from `since` until every object of each named group is ready (a failed call is
    ready too: its error is raised where the result is fetched)."""
    waiting = {name: set(refs) for name, refs in in_flight.items()}
    done: dict[str, float] = {}
    while waiting:
        ready, _ = ray.wait([r for refs in waiting.values() for r in refs], num_returns=1, fetch_local=False)
        now = time.perf_counter() - since
        for name in list(waiting):
            waiting[name] -= set(ready)
            if not waiting[name]:
                done[name] = now
                del waiting[name]
    return done


def _pick(values, keep: list[bool]):
    return None if values is None else [v for v, k in zip(values, keep, strict=True) if k]

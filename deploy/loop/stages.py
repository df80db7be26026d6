"""The stages of one training step, shared by the synchronous and the overlapped loop:

    draw → generate → score → experience → train → publish

Each loop (`synchronous.py`, `overlapped.py`) calls them in this order; they differ only in
where a generated batch comes from (generated now, or taken from the fleet's queue) and in what
runs beside the learner. The per-token rows (old log-probs, values, reference log-probs) stay
in Ray's object store from the actor that computed them to the learner that trains on them
(`Held`); the driver handles scores, rollouts and row selections.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from rlfleet.common.config import RunConfig
from rlfleet.common.data import Example, PromptDataset, PromptSampler
from rlfleet.common.records import Experience, RolloutBatch, SamplingSpec, StepResult
from rlfleet.deploy.actors.parts import Parts
from rlfleet.deploy.loop import episodes
from rlfleet.deploy.loop.baselines import greedy_baselines
from rlfleet.deploy.loop.groups import ScoredBatch, choose_groups, informative_groups, merge
from rlfleet.deploy.loop.health import UnscorableLog
from rlfleet.deploy.loop.scoring import Scoring, Streamed, scored
from rlfleet.learner.objective import estimator_info
from rlfleet.services.reward_service import drop_unscorable
from rlfleet.weight_sync import WEIGHT_SYNC

logger = logging.getLogger(__name__)


@dataclass
class PhaseTimer:
    """Seconds per phase of one step (`timing/<phase>`)."""

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


@dataclass
class Generated:
    """A generated batch on its way to the learner: its prompts, rollouts, and its scoring
    calls when they were submitted early (the overlapped loop)."""

    examples: list[Example]
    batch: RolloutBatch
    scoring: Scoring | Streamed | None = None


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


def draw(cfg: RunConfig, data: PromptDataset, sampler: PromptSampler) -> list[Example]:
    """The next step's prompts."""
    return [data.examples[i] for i in sampler.next_batch(cfg.rollout.prompts_per_step)]


def score(cfg: RunConfig, parts: Parts, first: Generated, timer: PhaseTimer,
          extra: Iterable[Generated] = ()) -> tuple[ScoredBatch, dict[str, float]]:
    """The batch scored (reward ∥ reference ∥ old log-probs; submitted now unless it already
    was). With `algorithm.filter_groups`, batches from `extra` (generated as they are taken)
    are added until the step has `rollout.prompts_per_step` informative groups."""
    with timer("score"):
        sb = scored(cfg, parts, first.examples, first.batch, first.scoring, timer)
    if not cfg.algorithm.filter_groups:
        return sb, {}
    wanted, added = cfg.rollout.prompts_per_step, 0
    more = iter(extra)
    with timer("extra_batches"):
        while (added < cfg.algorithm.max_extra_batches
               and len(informative_groups(sb.scored.scores, [r.prompt_index for r in sb.rollouts])) < wanted):
            nxt = next(more)
            sb = merge(sb, scored(cfg, parts, nxt.examples, nxt.batch, nxt.scoring, timer))
            added += 1
    sb, filtered = choose_groups(sb, wanted)
    return sb, {"rollout/extra_batches": float(added), "rollout/filtered_groups": float(filtered)}


def experience(cfg: RunConfig, parts: Parts, sb: ScoredBatch, timer: PhaseTimer, unscorable: UnscorableLog,
               version: int | None = None) -> tuple[dict[str, Any], Experience | None]:
    """The batch's metrics and what the learner trains on (None: every group was unscorable);
    groups with an unscorable response are left out whole (`unscorable` notes why). `version`:
    the learner's, to report the records' staleness."""
    rollouts, scores = sb.rollouts, sb.scored
    group_ids = [r.prompt_index for r in rollouts]
    keep = drop_unscorable(scores, group_ids, cfg.reward.on_unscorable, cfg.reward.max_failures)
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
        "rollout/lost_workers": float(stats.lost),
        "rollout/workers_down": float(parts.pool.num_down),
        "rollout/timeouts": float(stats.timeouts),
        "rollout/dropped_prompts": float(sb.dropped),
        "reward/unscorable": float(len(keep) - sum(keep)),
        "rollout/tokens_per_s": sb.num_tokens / max(sb.generate_seconds, 1e-9),
        "timing/generate_busy": sb.generate_seconds,  # the engines' own time (the longest call of each batch)
        "rollout/policy_version": float(rollouts[0].policy_version) if rollouts else 0.0,
        "services/retries": float(parts.service_retries),
    }
    if version is not None:
        staleness = [version - r.policy_version for r in rollouts]
        metrics.update({"rollout/staleness_mean": sum(staleness) / max(len(staleness), 1),
                        "rollout/staleness_max": float(max(staleness, default=0))})
    metrics.update(episodes.episode_metrics(rollouts))
    metrics.update(unscorable.see(scores))
    metrics.update(scores.log_metrics())
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
        scores=_pick(scores.scores, keep),
        group_ids=_pick(group_ids, keep),
        old_logprobs=take(sb.old_logprobs),
        values=take(sb.values),
        ref_logprobs=take(sb.ref),
        components={name: _pick(values, keep) for name, values in scores.components.items()},
        weights=dict(scores.weights),
        baselines=_pick(baselines, keep),
    )
    return {**metrics, "learner/updated": 1.0}, exp


def submit_train(cfg: RunConfig, parts: Parts, exp: Experience) -> list[ray.ObjectRef]:
    """The update in flight on every learner rank (rank 0's result first)."""
    return parts.learner.submit_train(exp)


def trained(pending: list[ray.ObjectRef]) -> StepResult:
    """Rank 0's result of `submit_train`."""
    return ray.get(pending)[0]


def push_weights(cfg: RunConfig, parts: Parts, version: int) -> list[int] | None:
    """Hand the learner's current weights to every rollout worker as `version`, by the
    `rollout.weight_sync` method (the overlapped loop: queued behind the generate calls already
    submitted); the versions the workers report after it (None when queued)."""
    try:
        sync = WEIGHT_SYNC[cfg.rollout.weight_sync]
        return parts.pool.push_weights(sync.source(version, parts.learner, cfg.rollout.tensor_parallel_size))
    except ray.exceptions.RayActorError as err:
        raise RuntimeError(f"the push of policy v{version} failed: an actor died ({err}); the last "
                           "checkpoint is untouched, and `rlfleet train` resumes from it") from err


def step_metrics(metrics: dict[str, Any], result: StepResult | None, timer: PhaseTimer, began: float) -> dict:
    """A step's row: the learner's metrics, the batch's, the phases' seconds."""
    learned = result.metrics if result is not None else {}
    return {**learned, **metrics, **timer.metrics(), "timing/step": time.perf_counter() - began}


def _pick(values, keep: list[bool]):
    return None if values is None else [v for v, k in zip(values, keep, strict=True) if k]

"""Scoring a generated batch: the reward, reference and old-log-prob calls, submitted together
(three concurrent actor calls) and collected with each call's latency. Reward and reference
calls go through one typed client each (`services/client.py`: restart-and-retry); the services
are stateless. In the overlapped loop a batch's scoring may be submitted part by part as the
fleet completes its groups (`Streamed`)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import ray

from rlfleet.common.config import RunConfig
from rlfleet.common.data import Example
from rlfleet.common.records import Held, Rollout, RolloutBatch, ScoreBatch
from rlfleet.deploy.actors.parts import Parts
from rlfleet.deploy.loop import episodes
from rlfleet.deploy.loop.groups import ScoredBatch, join
from rlfleet.learner.step_data import needs_prepare
from rlfleet.services.client import Call

LATENCY_WAIT_S = 3600.0
"""The longest a call's latency is waited for (fetching its result has its own deadline)."""


class Timer(Protocol):
    seconds: dict[str, float]

    def add(self, phase: str, seconds: float) -> None: ...


def scored(cfg: RunConfig, parts: Parts, examples: list[Example], batch: RolloutBatch,
           scoring: Scoring | Streamed | None, timer: Timer) -> ScoredBatch:
    """The batch with its scores and the rows left in the object store (`scoring`: the calls
    already submitted, else submitted now)."""
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


def collect_streamed(parts: Parts, s: Streamed, timer: Timer) -> tuple[ScoreBatch, tuple[Held | None, ...]]:
    """The parts' results joined in the batch's order; `timer` gets each call's longest latency."""
    collected = []
    for part in s.parts:
        own = type(timer)()
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


def collect_scoring(parts: Parts, s: Scoring, timer: Timer) -> tuple[ScoreBatch, tuple[Held | None, ...]]:
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
        ready, _ = ray.wait([r for refs in waiting.values() for r in refs], num_returns=1, fetch_local=False,
                            timeout=LATENCY_WAIT_S)
        if not ready:  # unmeasured; fetching the result raises with the call's own deadline
            break
        now = time.perf_counter() - since
        for name in list(waiting):
            waiting[name] -= set(ready)
            if not waiting[name]:
                done[name] = now
                del waiting[name]
    return done

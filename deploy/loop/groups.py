"""Scored batches as prompt groups: merging the batches of one step and choosing the groups
it trains on (dynamic sampling, `algorithm.filter_groups`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from rlfleet.common.data import Example
from rlfleet.common.records import Held, Rollout, ScoreBatch


@dataclass(frozen=True)
class ScoredBatch:
    """Generated and scored responses of one or more batches; `Rollout.prompt_index` indexes
    `examples` (a response's group)."""

    examples: list[Example]
    rollouts: list[Rollout]
    scored: ScoreBatch
    old_logprobs: Held | None
    """Rows left in the object store (None: not computed)."""
    values: Held | None
    ref: Held | None
    generate_seconds: float
    num_tokens: int
    dropped: int
    """Prompts the fleet dropped (empty or too long: `rollout.on_bad_prompt: drop`)."""


def add_logs(*logs: dict[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
    """`ScoreBatch.logs` of several batches together."""
    out: dict[str, tuple[float, int]] = {}
    for part in logs:
        for name, (total, count) in part.items():
            t, c = out.get(name, (0.0, 0))
            out[name] = (t + total, c + count)
    return out


def _cat(a: Held | None, b: Held | None) -> Held | None:
    return None if a is None or b is None else a.then(b)


def merge(a: ScoredBatch, b: ScoredBatch) -> ScoredBatch:
    """`a`'s groups, then `b`'s (their prompt indices shifted past `a`'s examples)."""
    shift = len(a.examples)
    sa, sb = a.scored, b.scored
    scored = ScoreBatch(
        sa.scores + sb.scores,
        {k: sa.components[k] + sb.components.get(k, [None] * len(sb.scores)) for k in sa.components},
        sa.reasons + sb.reasons, {**sb.weights, **sa.weights}, add_logs(sa.logs, sb.logs),
    )
    return ScoredBatch(
        a.examples + b.examples,
        a.rollouts + [replace(r, prompt_index=r.prompt_index + shift) for r in b.rollouts],
        scored,
        _cat(a.old_logprobs, b.old_logprobs), _cat(a.values, b.values), _cat(a.ref, b.ref),
        a.generate_seconds + b.generate_seconds, a.num_tokens + b.num_tokens, a.dropped + b.dropped,
    )


def join(collected: list[tuple[ScoreBatch, tuple[Held | None, ...]]], order: list[int],
         ) -> tuple[ScoreBatch, tuple[Held | None, ...]]:
    """Scoring results of consecutive row ranges joined, then the rows `order` (of the joined rows)."""
    pick = lambda values: [values[i] for i in order]  # noqa: E731
    batches = [b for b, _ in collected]
    names = list(batches[0].components) if batches else []
    scored = ScoreBatch(pick([s for b in batches for s in b.scores]),
                        {k: pick([v for b in batches for v in b.components[k]]) for k in names},
                        pick([r for b in batches for r in b.reasons]),
                        {k: w for b in batches for k, w in b.weights.items()}, add_logs(*(b.logs for b in batches)))
    rows = []
    for i in range(3):  # old log-probs, values, reference log-probs
        held = [h[i] for _, h in collected]
        joined = None if not held or any(h is None for h in held) else held[0]
        for h in held[1:] if joined is not None else []:
            joined = joined.then(h)
        rows.append(None if joined is None else joined.take(order))
    return scored, tuple(rows)


def informative_groups(scores: Sequence[float | None], group_ids: Sequence[int]) -> list[int]:
    """Groups (in order of first appearance) whose scored responses do not all score alike:
    the others give a group-relative estimator no signal (DAPO's dynamic sampling)."""
    values: dict[int, set[float]] = {}
    for score, group in zip(scores, group_ids, strict=True):
        values.setdefault(group, set())
        if score is not None:
            values[group].add(score)
    return [g for g, seen in values.items() if len(seen) > 1]


def choose_groups(batch: ScoredBatch, wanted: int) -> tuple[ScoredBatch, int]:
    """`wanted` groups, informative ones first (in order), then others where too few are; and
    how many uninformative groups were left out."""
    groups = list(dict.fromkeys(r.prompt_index for r in batch.rollouts))
    good = informative_groups(batch.scored.scores, [r.prompt_index for r in batch.rollouts])
    informative = set(good)
    rest = [g for g in groups if g not in informative]
    chosen = set((good + rest)[:wanted])
    return select(batch, chosen), sum(g not in chosen for g in rest)


def select(batch: ScoredBatch, groups: set[int]) -> ScoredBatch:
    """The responses of `groups`, in their order."""
    idx = [i for i, r in enumerate(batch.rollouts) if r.prompt_index in groups]
    pick = lambda values: None if values is None else [values[i] for i in idx]  # noqa: E731
    s = batch.scored
    scored = ScoreBatch(pick(s.scores), {k: pick(v) for k, v in s.components.items()}, pick(s.reasons), s.weights,
                        s.logs)
    take = lambda held: None if held is None else held.take(idx)  # noqa: E731
    return replace(batch, rollouts=pick(batch.rollouts), scored=scored, old_logprobs=take(batch.old_logprobs),
                   values=take(batch.values), ref=take(batch.ref))

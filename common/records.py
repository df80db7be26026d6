"""Typed records passed between actors.

Notation: P prompts in a request, n samples per prompt, T response length.
Every rollout record carries the policy version that produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample responses; the learner recomputes log-probs with the same temperature."""

    n: int = 1
    """Responses per prompt."""
    max_tokens: int = 64
    """Longest response, in tokens."""
    min_tokens: int = 0
    """EOS and stop ids are suppressed until this many tokens exist. It changes the sampling
    distribution away from the learner's, so use it for benchmarks, not training."""
    temperature: float = 1.0
    """Logits are divided by this before sampling; 0 means greedy decoding (log-probs are then
    those of log_softmax(logits), temperature 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k sampling; -1 disables it."""
    stop: tuple[str, ...] = ()
    """Strings that end a response."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response (besides EOS), kept in the response like EOS."""
    seed: int | None = None
    """Seed of the request: sample k of prompt i uses seed + i·n + k, so the n samples of a
    prompt are independent and a rerun is reproducible; None uses the engine's generator."""

    def __post_init__(self) -> None:
        checks = [
            ("n", self.n >= 1, ">= 1"),
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "in [0, max_tokens]"),
            ("temperature", self.temperature >= 0, ">= 0 (0 is greedy decoding)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, "-1 (off) or >= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SamplingSpec.{name}={getattr(self, name)!r} must be {rule}")

    @property
    def matches_learner(self) -> bool:
        """True when the learner's log_softmax(logits / temperature) is the sampling distribution."""
        return self.top_p == 1.0 and self.top_k == -1


# A prompt is token ids, plain text, or chat messages rendered with the tokenizer's template.
PromptInput = list[int] | str | list[dict[str, str]]


@dataclass(frozen=True)
class Rollout:
    """One sampled response to one prompt."""

    prompt_index: int
    """Index of the prompt in the request that produced this response."""
    prompt_ids: list[int]
    """Prompt token ids [prompt length]."""
    response_ids: list[int]
    """Response token ids [T]; the EOS token is included when it was generated."""
    logprobs: list[float]
    """Log-probability [T] of each sampled token under the sampling distribution."""
    finish_reason: Literal["stop", "length"]
    """'stop': EOS or a stop string ended it; 'length': it hit max_tokens."""
    policy_version: int
    """Version of the weights that generated it (0 = initial weights); the oldest of an
    episode's turns."""
    loss_mask: list[int] | None = None
    """Multi-turn episodes: 1 on generated tokens, 0 on observation tokens (a tool's output, the
    environment's feedback) [T]; None: every response token was generated."""
    episode: Episode | None = None
    """Multi-turn episodes: rewards, turns and tool use (None for a single response)."""
    token_versions: list[int] | None = None
    """`rollout.partial_rollout`: the version that generated each response token [T] (a push
    may land mid-response); None: every token is `policy_version`'s."""

    def __post_init__(self) -> None:
        if self.loss_mask is not None and len(self.loss_mask) != len(self.response_ids):
            raise ValueError(f"Rollout.loss_mask has {len(self.loss_mask)} entries for "
                             f"{len(self.response_ids)} response tokens")
        if self.token_versions is not None and len(self.token_versions) != len(self.response_ids):
            raise ValueError(f"Rollout.token_versions has {len(self.token_versions)} entries for "
                             f"{len(self.response_ids)} response tokens")


@dataclass(frozen=True)
class Episode:
    """What a multi-turn episode adds to its `Rollout` (the response holds every turn's
    generated ids followed by the observation ids, each observation tokenized once)."""

    reward: float
    """The sum of the turns' rewards: the episode's score."""
    turn_ends: list[int]
    """Index in the response of each turn's last generated token."""
    turn_rewards: list[float]
    """Each turn's reward (the environment's answer to that turn)."""
    turn_versions: list[int]
    """The policy version that generated each turn."""
    success: bool
    """The environment's own verdict (`info['success']` of the last step, else reward > 0)."""
    tool_calls: int = 0
    """Turns whose answer was a tool result (or a tool error)."""
    tool_errors: int = 0
    """Turns whose tool call failed (`info['tool_error']` set)."""
    restarts: int = 0
    """Times this episode was re-run from its start (its environment actor died)."""

    @property
    def turns(self) -> int:
        return len(self.turn_ends)


@dataclass(frozen=True)
class RolloutBatch:
    """What one worker returns for one generate call."""

    rollouts: list[Rollout]
    """P × n records, grouped by prompt in request order."""
    worker_id: str
    """Which worker produced them."""
    generate_seconds: float
    """Wall time of the engine call."""
    num_tokens: int = field(default=0)
    """Response tokens generated."""
    dropped: list[int] = field(default_factory=list)
    """Indices (in the request) of prompts dropped as bad input (rollout.on_bad_prompt='drop')."""


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of B responses from the reward service."""

    scores: list[float | None]
    """Weighted sum of the sources per response; None where it is unscorable."""
    components: dict[str, list[float | None]]
    """Each source's own (unweighted) value per response: 'model' (the reward model's raw
    score), 'rules[i]', 'remote', 'environment'."""
    reasons: list[str | None]
    """Why a response is unscorable ('rules[0]:timeout', 'remote:error', …), else None."""
    weights: dict[str, float] = field(default_factory=dict)
    """Each source's weight in `scores`. `scores` holds the reward model's raw value; the
    learner normalises it (`common/reward_scale.py`) and sums again."""
    logs: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Numbers the sources returned beside their values ('rules[0]/acc' → (sum, count)), over
    every response scored (a verl dict's other keys, OpenRLHF's extra_logs)."""

    def log_metrics(self) -> dict[str, float]:
        """`reward/logs/<component>/<name>`: the mean of each logged number."""
        return {f"reward/logs/{name}": total / count for name, (total, count) in self.logs.items() if count}

    @property
    def unscorable_counts(self) -> dict[str, int]:
        """Reason → number of responses, for metrics."""
        counts: dict[str, int] = {}
        for r in self.reasons:
            if r is not None:
                counts[r] = counts.get(r, 0) + 1
        return counts


@dataclass(frozen=True)
class Prepared:
    """What the learner computes for a batch before training, with the weights that generated it."""

    old_logprobs: list[list[float]] | None
    """log π_old of every response token [B][T_b], at the rollout temperature (None when the
    update computes them itself: one update per batch)."""
    values: list[list[float]] | None
    """Critic values V_t [B][T_b] (None without a critic)."""
    ref_logprobs: list[list[float]] | None = None
    """Reference log-probs, when the reference lives in the learner (else None)."""


@dataclass(frozen=True)
class Held:
    """Per-response rows (old log-probs, values, reference log-probs) that stay in Ray's object
    store, where the actor that computed them put them, until the learner that trains on them
    fetches them: the driver only selects rows. `parts`: (the batch rows an object holds, in its
    order; its ObjectRef; the field of a `Prepared` to read, or None for a plain list of rows).
    `rows`: the rows of this selection, in order."""

    parts: tuple[tuple[tuple[int, ...], Any, str | None], ...]
    rows: tuple[int, ...]

    @classmethod
    def of(cls, parts: list[tuple[list[int], Any]], name: str | None = None) -> Held:
        """Every row the `parts` hold, in row order."""
        spans = tuple((tuple(rows), ref, name) for rows, ref in parts)
        return cls(spans, tuple(sorted(r for rows, _, _ in spans for r in rows)))

    @property
    def span(self) -> int:
        """Rows covered by the parts (the next batch's rows are numbered from here)."""
        return 1 + max((r for rows, _, _ in self.parts for r in rows), default=-1)

    def take(self, idx: list[int]) -> Held:
        """The selection's `idx`-th rows, in that order."""
        return Held(self.parts, tuple(self.rows[i] for i in idx))

    def then(self, other: Held) -> Held:
        """This selection followed by `other`'s (its rows renumbered past this one's)."""
        shift = self.span
        moved = tuple((tuple(r + shift for r in rows), ref, name) for rows, ref, name in other.parts)
        return Held(self.parts + moved, self.rows + tuple(r + shift for r in other.rows))

    def fetch(self, get: Callable[[list], list], cache: dict | None = None) -> list[list[float]] | None:
        """The rows (None when the objects hold none of this field: no critic, say), the
        objects read with `get` (`ray.get`); `cache` keeps the objects read, for other
        selections of the same objects."""
        cache = {} if cache is None else cache
        missing = [ref for _, ref, _ in self.parts if ref not in cache]
        if missing:
            cache.update(zip(missing, get(missing), strict=True))
        objects = [cache[ref] for _, ref, _ in self.parts]
        by_row: dict[int, list[float]] = {}
        for (rows, _, name), obj in zip(self.parts, objects, strict=True):
            data = getattr(obj, name) if name is not None else obj
            if data is None:
                return None
            by_row.update(zip(rows, data, strict=True))
        return [by_row[r] for r in self.rows]


@dataclass(frozen=True)
class Experience:
    """One step's training data: B scored responses with everything the learner needs. The
    per-token rows may be `Held`: left in Ray's object store by the actor that computed them,
    fetched by the learner (`Held.fetch`)."""

    rollouts: list[Rollout]
    """The responses (their prompt, tokens, vLLM log-probs, version and finish reason)."""
    scores: list[float]
    """Sequence scores [B] from the reward service (the reward model's component raw)."""
    group_ids: list[int]
    """Prompt group of each response [B] (responses to one prompt share an id)."""
    old_logprobs: list[list[float]] | Held | None
    """From `Prepared`; None: the update's own log-probs, detached (one update per batch)."""
    values: list[list[float]] | Held | None
    """From `Prepared` (None without a critic)."""
    ref_logprobs: list[list[float]] | Held | None
    """Reference log-probs [B][T_b]; None when no KL term is used."""
    components: dict[str, list[float | None]] | None = None
    """`ScoreBatch.components` of the responses: the learner normalises the reward model's."""
    weights: dict[str, float] | None = None
    """`ScoreBatch.weights`."""
    baselines: list[float] | None = None
    """[B] the reward of the greedy response to each response's prompt (ReMax's baseline; that
    response is generated beside the batch and never trained on)."""


@dataclass(frozen=True)
class StepResult:
    """What one learner step reports."""

    version: int
    """Policy version of the weights after the step (the next push carries it)."""
    metrics: dict[str, float | None]
    """Metric name → value (`rlfleet.common.metric_names`; None where a metric does not apply)."""


@dataclass(frozen=True)
class ScaleDecision:
    """What the driver did with a request for rollout workers, at a step boundary."""

    ticket: int
    requested: int
    outcome: str
    """'granted' (the fleet is that size now), 'unchanged' (it already was) or 'refused'."""
    reason: str
    """Why it was refused (the resources the cluster lacks), else ''."""
    after_step: int
    rollout_workers: int
    """The fleet's size after the decision."""

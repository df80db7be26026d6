"""Reward sources: the protocol every source implements, the built-in ones (a reward model,
rule functions, a remote scorer), and the one function that builds a run's sources from
`reward.*`.

A source scores a batch and returns one or more named components, each a value (or None, with
the reason) per response and its weight; the reward service sums the weighted components (a
response is unscorable when any component has no value for it). A source of your own is a class
registered in `rlfleet.common.registry.REWARD_SOURCES` and named in `reward.sources`; it is
built as `cls(weight=..., **kwargs)` in the reward service's process (list its module in
`plugins`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from rlfleet.common.config import RewardConfig, RuleRewardConfig
from rlfleet.common.registry import REWARD_SOURCES
from rlfleet.common.reward_scale import MODEL
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.services.decoding import TextDecoder
from rlfleet.services.remote import RemoteScorer, RemoteScorerError
from rlfleet.services.rules import RuleRunner, judge


@dataclass
class ScoringBatch:
    """What a source scores: B (prompt, response) token-id pairs, the examples' other fields
    (e.g. a reference answer) and, decoded once on first use, their texts."""

    prompt_ids: Sequence[Sequence[int]]
    response_ids: Sequence[Sequence[int]]
    extras: Sequence[Mapping[str, Any]]
    decoder: TextDecoder = field(repr=False)

    @cached_property
    def prompts(self) -> list[str]:
        return self.decoder.batch_decode(self.prompt_ids)

    @cached_property
    def responses(self) -> list[str]:
        return self.decoder.batch_decode(self.response_ids)


@dataclass(frozen=True)
class Component:
    """One named part of the reward: a value per response (None where it could not score it,
    with the reason) and its weight in the sum."""

    name: str
    weight: float
    values: list[float | None]
    reasons: list[str | None]
    logs: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Numbers the source returned beside its values (a verl dict's other keys): name → (sum,
    count) over the responses; logged as `reward/logs/<component>/<name>` means."""

    @classmethod
    def of(cls, name: str, weight: float, values: Sequence[float | None]) -> Component:
        """From raw values: a non-finite or missing value is unscorable."""
        clean = [v if v is not None and math.isfinite(v) else None for v in values]
        return cls(name, weight, clean, ["non_finite" if v is None else None for v in clean])


class RewardSource(Protocol):
    def score(self, batch: ScoringBatch) -> list[Component]:
        """Components for the batch (each with one value per response)."""
        ...

    def close(self) -> None:
        """Release processes and connections."""
        ...


class ModelSource:
    """A sequence-classification reward model (`reward.model_path`); its raw score (the
    learner normalises it)."""

    def __init__(self, config: RewardConfig, threads: ThreadBudget | None, compute_dtype: str):
        from rlfleet.services.reward_model import (
            RewardModelScorer,  # torch and transformers only here
        )

        apply_thread_budget(threads)
        self.scorer = RewardModelScorer(config.model_path, config.micro_batch_size, compute_dtype=compute_dtype)
        self._weight = config.model_weight

    def score(self, batch: ScoringBatch) -> list[Component]:
        pairs = [list(p) + list(r) for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
        return [Component.of(MODEL, self._weight, self.scorer.score(pairs))]

    def close(self) -> None:
        pass


class RuleSource:
    """Rule functions (`reward.rules`), each a component `rules[i]`, run in the sandbox."""

    def __init__(self, rules: Sequence[RuleRewardConfig], runner: RuleRunner):
        self._rules = list(rules)
        self._runner = runner

    def score(self, batch: ScoringBatch) -> list[Component]:
        out = []
        for i, rule in enumerate(self._rules):
            outcomes = self._runner.run(rule.function, rule.timeout_s, batch.prompts, batch.responses, batch.extras,
                                        batch.response_ids)
            logs: dict[str, tuple[float, int]] = {}
            for outcome in outcomes:
                for key, value in (outcome.logs or {}).items():
                    total, count = logs.get(key, (0.0, 0))
                    logs[key] = (total + value, count + 1)
            out.append(Component(f"rules[{i}]", rule.weight, [o.value for o in outcomes], [o.why for o in outcomes],
                                 logs))
        return out

    def close(self) -> None:
        pass  # the runner is the service's (the gold checker shares it)


class RemoteSource:
    """A remote HTTP scorer (`reward.remote`): a failed request makes the batch unscorable."""

    def __init__(self, config: RewardConfig):
        r = config.remote
        self._weight = r.weight
        self._remote = RemoteScorer(r.url, r.token_env, r.timeout_s, r.max_retries)

    def score(self, batch: ScoringBatch) -> list[Component]:
        try:
            outcomes = [judge("ok", v) for v in self._remote.score(batch.prompts, batch.responses, batch.extras)]
        except RemoteScorerError as err:
            outcomes = [judge("error", str(err))] * len(batch.prompts)
        return [Component("remote", self._weight, [o.value for o in outcomes], [o.why for o in outcomes])]

    def close(self) -> None:
        self._remote.close()


def build_sources(config: RewardConfig, runner: RuleRunner | None, threads: ThreadBudget | None = None,
                  compute_dtype: str = "float32") -> list[RewardSource]:
    """Every source `config` names, each checked as it is built (a bad path or URL fails here,
    naming its field). `runner`: the rule processes, whose functions the caller has checked
    (None when there are no rules)."""
    sources: list[RewardSource] = []
    if config.model_path is not None:
        sources.append(ModelSource(config, threads, compute_dtype))
    if config.rules:
        sources.append(RuleSource(config.rules, runner))
    if config.remote is not None:
        sources.append(RemoteSource(config))
    for i, entry in enumerate(config.sources):
        try:
            sources.append(REWARD_SOURCES[entry.name](weight=entry.weight, **entry.kwargs))
        except Exception as err:
            raise ValueError(f"reward.sources[{i}] ({entry.name!r}) could not be built: {type(err).__name__}: {err}") \
                from err
    return sources

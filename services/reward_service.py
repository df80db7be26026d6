"""The reward service: one score per (prompt, response) from weighted reward sources.

Sources (`rlfleet.services.reward_sources`): a sequence-classification reward model, rule
functions, a remote scorer, and sources registered by plugins. Every source is built — and
checked — in the constructor, so a bad path, a rule that does not import or has the wrong
signature, a reward model with more than one label, or a remote URL that does not answer fails
at start-up, naming the config field, before any rollout is spent.

A response is unscorable when any source gives no finite value for it; its score is None and
its reason is recorded (never a silent 0). `drop_unscorable` applies the configured policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rlfleet.common.config import RewardConfig, RuleRewardConfig
from rlfleet.common.records import ScoreBatch
from rlfleet.common.registry import import_plugins
from rlfleet.common.reward_scale import weighted_sum
from rlfleet.common.threads import ThreadBudget
from rlfleet.services.decoding import TextDecoder
from rlfleet.services.info import ServiceInfo
from rlfleet.services.reward_sources import ModelSource, ScoringBatch, build_sources
from rlfleet.services.rules import RuleRunner, load_rule, weighted_rules


class UnscorableError(RuntimeError):
    """More responses were unscorable in one step than `reward.max_failures` allows."""


class RewardService:
    """Scores batches of token-id (prompt, response) pairs."""

    def __init__(self, config: RewardConfig, tokenizer_path: str, gold: Sequence[RuleRewardConfig] = (),
                 threads: ThreadBudget | None = None, compute_dtype: str = "float32", plugins: Sequence[str] = ()):
        """`gold`: rule functions used only by `gold()` (the run's `data.eval_reward`);
        `threads`: the reward model's thread budget (None leaves the process's threads alone);
        `compute_dtype`: the run's `model.dtype` for the reward model's forward passes;
        `plugins`: the run's `plugins` (modules that register reward sources)."""
        import_plugins(plugins)
        if config.model_path is None and not config.rules and config.remote is None and not config.sources:
            raise ValueError("reward: no reward source; set reward.model_path, reward.rules, reward.remote "
                             "or reward.sources")
        self._config = config
        self._gold = list(gold)
        self._decoder = TextDecoder(tokenizer_path)
        styles = {}
        for field, rules in (("reward.rules", config.rules), ("data.eval_reward", self._gold)):
            for i, rule in enumerate(rules):
                styles[rule.function] = load_rule(rule.function, f"{field}[{i}].function", rule.style)
        self._runner = RuleRunner(sorted(styles), config.rule_processes, styles) if styles else None
        self._sources = build_sources(config, self._runner, threads, compute_dtype)

    def info(self) -> ServiceInfo | None:
        """The reward model's size, device and dtype (None without a reward model)."""
        model = next((s for s in self._sources if isinstance(s, ModelSource)), None)
        return model.scorer.info() if model is not None else None

    def health(self) -> bool:
        return True

    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        extras: Sequence[Mapping[str, Any]] | None = None,
    ) -> ScoreBatch:
        """Score B responses; `extras` are the examples' other fields (e.g. a reference answer).

        Stateless: the same call gives the same scores on any actor, a restarted one too. The
        reward model's score comes raw; the learner normalises it (`common/reward_scale.py`)."""
        extras = extras if extras is not None else [{}] * len(prompt_ids)
        batch = ScoringBatch(prompt_ids, response_ids, extras, self._decoder)
        components: dict[str, list[float | None]] = {}
        reasons: list[str | None] = [None] * len(prompt_ids)
        weights: dict[str, float] = {}
        logs: dict[str, tuple[float, int]] = {}
        for source in self._sources:
            for part in source.score(batch):
                if len(part.values) != len(prompt_ids):
                    raise ValueError(f"reward source {type(source).__name__} gave {len(part.values)} values for "
                                     f"{part.name!r}, not one per response ({len(prompt_ids)})")
                components[part.name] = part.values
                weights[part.name] = part.weight
                _mark(reasons, part.name, part.reasons)
                logs.update({f"{part.name}/{key}": total for key, total in part.logs.items()})
        return ScoreBatch(weighted_sum(components, weights, reasons), components, reasons, weights, logs)

    def gold(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        extras: Sequence[Mapping[str, Any]],
    ) -> list[float | None]:
        """The gold checker's weighted sum per response (None where a rule could not score
        it); used at evaluation only."""
        if not self._gold:
            raise ValueError("this reward service has no gold checker (data.eval_reward)")
        prompts = self._decoder.batch_decode(prompt_ids)
        responses = self._decoder.batch_decode(response_ids)
        return weighted_rules(self._runner, self._gold, prompts, responses, extras)

    def close(self) -> None:
        for source in self._sources:
            source.close()
        if self._runner is not None:
            self._runner.close()


def _mark(reasons: list[str | None], source: str, new: Sequence[str | None]) -> None:
    """Record the first reason each response became unscorable."""
    for i, reason in enumerate(new):
        if reason is not None and reasons[i] is None:
            reasons[i] = f"{source}:{reason}"


def drop_unscorable(
    batch: ScoreBatch, group_ids: Sequence[int], policy: str, max_failures: int
) -> list[bool]:
    """Which responses to keep: every group with an unscorable response is dropped whole
    (its baseline would be wrong). With policy 'fail', more than `max_failures` unscorable
    responses raise `UnscorableError` instead."""
    bad = [i for i, s in enumerate(batch.scores) if s is None]
    if policy == "fail" and len(bad) > max_failures:
        raise UnscorableError(
            f"{len(bad)} unscorable responses in this step exceed reward.max_failures={max_failures} "
            f"(reward.on_unscorable='fail'); reasons: {batch.unscorable_counts}"
        )
    dropped_groups = {group_ids[i] for i in bad}
    return [g not in dropped_groups for g in group_ids]

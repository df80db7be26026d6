"""The reward service: one score per (prompt, response) from weighted reward sources.

Sources: a sequence-classification reward model, rule functions, a remote scorer. Every
source is built — and checked — in the constructor, so a bad path, a rule that does not
import or has the wrong signature, a reward model with more than one label, or a remote URL
that does not answer fails at start-up, naming the config field, before any rollout is spent.

A response is unscorable when any source gives no finite value for it; its score is None and
its reason is recorded (never a silent 0). `drop_unscorable` applies the configured policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rlfleet.common.config import RewardConfig, RuleRewardConfig
from rlfleet.common.records import ScoreBatch
from rlfleet.common.reward_scale import MODEL, weighted_sum
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.services.decoding import TextDecoder
from rlfleet.services.info import ServiceInfo
from rlfleet.services.remote import RemoteScorer, RemoteScorerError
from rlfleet.services.rules import RuleRunner, judge, load_rule, weighted_rules


class UnscorableError(RuntimeError):
    """More responses were unscorable in one step than `reward.max_failures` allows."""


class RewardService:
    """Scores batches of token-id (prompt, response) pairs."""

    def __init__(self, config: RewardConfig, tokenizer_path: str, gold: Sequence[RuleRewardConfig] = (),
                 threads: ThreadBudget | None = None, compute_dtype: str = "float32"):
        """`gold`: rule functions used only by `gold()` (the run's `data.eval_reward`);
        `threads`: the reward model's thread budget (None leaves the process's threads alone);
        `compute_dtype`: the run's `model.dtype` for the reward model's forward passes."""
        if config.model_path is None and not config.rules and config.remote is None:
            raise ValueError("reward: no reward source; set reward.model_path, reward.rules or reward.remote")
        self._config = config
        self._gold = list(gold)
        self._decoder = TextDecoder(tokenizer_path)
        self._model = None
        if config.model_path is not None:
            # torch and transformers only where there is a model
            from rlfleet.services.reward_model import RewardModelScorer

            apply_thread_budget(threads)
            self._model = RewardModelScorer(config.model_path, config.micro_batch_size, compute_dtype=compute_dtype)
        for i, rule in enumerate(config.rules):
            load_rule(rule.function, field=f"reward.rules[{i}].function")
        for i, rule in enumerate(self._gold):
            load_rule(rule.function, field=f"data.eval_reward[{i}].function")
        paths = sorted({r.function for r in [*config.rules, *self._gold]})
        self._runner = RuleRunner(paths, config.rule_processes) if paths else None
        self._remote = None
        if config.remote is not None:
            r = config.remote
            self._remote = RemoteScorer(r.url, r.token_env, r.timeout_s, r.max_retries)

    def info(self) -> ServiceInfo | None:
        """The reward model's size, device and dtype (None without a reward model)."""
        return self._model.info() if self._model is not None else None

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
        components: dict[str, list[float | None]] = {}
        reasons: list[str | None] = [None] * len(prompt_ids)
        weights: dict[str, float] = {}
        if self._model is not None:
            raw = self._model.score([list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)])
            components[MODEL] = [v if math.isfinite(v) else None for v in raw]
            weights[MODEL] = self._config.model_weight
            _mark(reasons, "model", ["non_finite" if v is None else None for v in components["model"]])
        if self._runner is not None or self._remote is not None:
            prompts = self._decoder.batch_decode(prompt_ids)
            responses = self._decoder.batch_decode(response_ids)
            self._score_text(prompts, responses, extras, components, weights, reasons)
        return ScoreBatch(weighted_sum(components, weights, reasons), components, reasons, weights)

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

    def _score_text(self, prompts, responses, extras, components, weights, reasons) -> None:
        for i, rule in enumerate(self._config.rules):
            name = f"rules[{i}]"
            outcomes = self._runner.run(rule.function, rule.timeout_s, prompts, responses, extras)
            components[name] = [o.value for o in outcomes]
            weights[name] = rule.weight
            _mark(reasons, name, [o.why for o in outcomes])
        if self._remote is not None:
            try:
                raw = self._remote.score(prompts, responses, extras)
                outcomes = [judge("ok", v) for v in raw]
            except RemoteScorerError as err:
                outcomes = [judge("error", str(err))] * len(prompts)
            components["remote"] = [o.value for o in outcomes]
            weights["remote"] = self._config.remote.weight
            _mark(reasons, "remote", [o.why for o in outcomes])

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        if self._remote is not None:
            self._remote.close()


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

"""A run that cannot learn says why, early.

`UnscorableLog` keeps why responses were unscorable, per reward source: the first few
distinct reasons of a source are logged at the step where they appear, and each step's
metrics get `reward/unscorable/<source>`. `RunHealth` reads each step's metrics and

- stops the run (`RunHealthError`) when, for `run_health.patience` steps in a row, every
  response was unscorable or no update was made (every group dropped, or every token
  rejected by the rollout correction), naming the cause, the source and its last reason; a
  run that ends having made no update at all stops the same way, never with exit 0;
- warns, once per cause and with its step numbers, of a run that learns nothing: no reward
  spread within any group (a group-relative estimator gets no signal), (nearly) every response
  cut at the token limit, a learner/engine log-prob gap or a KL that grows step after step past its
  threshold, an entropy that collapsed while the reward did not rise.

Every message starts with "run health:".
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from rlfleet.common.config import RunConfig
from rlfleet.common.records import ScoreBatch
from rlfleet.common.registry import group_relative

logger = logging.getLogger(__name__)

SHOWN_REASONS = 3
"""Distinct unscorable reasons logged per source."""
TRUNCATED = 0.9
"""The share of responses cut at the token limit, step after step, that is warned of (nearly
all: a freshly initialised model emits EOS now and then by chance)."""


class RunHealthError(RuntimeError):
    """The run cannot learn (every response unscorable, or no update made, for
    `run_health.patience` steps; or no update at all by the end)."""

    exit_code = 3


class UnscorableLog:
    """Why responses were unscorable, per reward source."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = defaultdict(list)
        self.last: dict[str, str] = {}
        self.step = 0
        """The step being scored (set by the loop)."""

    def see(self, scored: ScoreBatch) -> dict[str, float]:
        """Log the new reasons of this step's batch; its per-source counts as metrics."""
        counts: dict[str, float] = defaultdict(float)
        for reason in scored.reasons:
            if reason is None:
                continue
            source, _, why = reason.partition(":")
            counts[f"reward/unscorable/{source}"] += 1.0
            self.last[source] = why
            if why not in self.seen[source] and len(self.seen[source]) < SHOWN_REASONS:
                self.seen[source].append(why)
                logger.warning("run health: step %d: %s could not score a response: %s", self.step, source, why)
        return dict(counts)


def _updates(n: int) -> str:
    return f"{n} update{'' if n == 1 else 's'}"


def _steps(steps: list[int]) -> str:
    return f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else str(steps[0])


class RunHealth:
    """Watches a run's step metrics (see the module docstring)."""

    def __init__(self, cfg: RunConfig):
        self._cfg = cfg
        self._h = cfg.run_health
        self.updates = 0
        self._history: list[tuple[int, dict[str, Any]]] = []
        self._first: dict[str, Any] | None = None
        self.warned: list[str] = []

    def see(self, step: int, metrics: dict[str, Any], unscorable: UnscorableLog) -> None:
        """After step `step`: raise RunHealthError if the run cannot learn; warn of what it learns nothing from."""
        updated = metrics.get("learner/updated", 1.0) > 0 and metrics.get(
            "rollout_corr/rollout_rs_masked_fraction", 0.0) < 1.0
        self.updates += updated
        self._first = self._first or metrics
        self._history = [*self._history[-self._h.patience:], (step, {**metrics, "_updated": updated})]
        recent = self._history[-self._h.patience:]
        if len(recent) < self._h.patience:
            return
        steps = [s for s, _ in recent]
        if all(_all_unscorable(m) for _, m in recent):
            raise RunHealthError(self._unscorable_message(steps, recent[-1][1], unscorable))
        if not any(m["_updated"] for _, m in recent):
            raise RunHealthError(
                f"run health: no update was made in steps {_steps(steps)} "
                f"({self._no_update_cause(recent[-1][1])}); {_updates(self.updates)} in the run. Stopping.")
        self._warnings(steps, [m for _, m in recent])

    def finish(self, steps_run: int) -> None:
        """At the end of the run: one that made no update never ends quietly."""
        if steps_run and self.updates == 0:
            raise RunHealthError(f"run health: the run ended after {steps_run} steps having made no update "
                                 "(see the warnings above for why); nothing was trained")

    def _unscorable_message(self, steps: list[int], last: dict[str, Any], log: UnscorableLog) -> str:
        sources = sorted(k.split("/", 2)[2] for k in last if k.startswith("reward/unscorable/"))
        named = "; ".join(f"{s}: {int(last[f'reward/unscorable/{s}'])} of {int(last['rollout/num_samples'])}, "
                          f"last reason {log.last.get(s)!r}" for s in sources)
        return (f"run health: every response of steps {_steps(steps)} was unscorable ({named}); "
                f"{_updates(self.updates)} made. Fix the reward source above (its reason says what it "
                "received and did), or check that it accepts rlfleet's rule signature fn(prompt, response, extra)")

    def _no_update_cause(self, last: dict[str, Any]) -> str:
        if last.get("rollout_corr/rollout_rs_masked_fraction", 0.0) >= 1.0:
            rc = self._cfg.algorithm.rollout_correction
            return (f"the rollout correction rejected every token: rs_options={rc.rs_options!r}, "
                    f"rs_threshold={rc.rs_threshold!r}; widen the band or lower the learning rate")
        return "every group was dropped as unscorable (reward.on_unscorable='drop_group')"

    def _warn(self, cause: str, message: str) -> None:
        if cause not in self.warned:
            self.warned.append(cause)
            logger.warning("run health: %s", message)

    def _warnings(self, steps: list[int], recent: list[dict[str, Any]]) -> None:
        h, first = self._h, self._first or {}
        flat = all(m.get("reward", 0.0) <= first.get("reward", 0.0) + 1e-6 for m in recent)
        if (group_relative(self._cfg.algorithm.advantage_estimator) and flat
                and all(m.get("frac_reward_zero_std") == 1.0 for m in recent)):
            self._warn("zero_spread", (
                f"steps {_steps(steps)}: every group's responses got the same reward (frac_reward_zero_std 1.0, "
                f"reward {recent[-1].get('reward'):.4g}): {self._cfg.algorithm.advantage_estimator} learns nothing. "
                "Check the reward function (is it constant?), raise rollout.temperature, or enable "
                "algorithm.filter_groups (dynamic sampling)"))
        if all(m.get("completions/clipped_ratio", 0.0) >= TRUNCATED for m in recent):
            ratios = ", ".join(f"{m['completions/clipped_ratio']:.0%}" for m in recent)
            self._warn("truncated", (
                f"steps {_steps(steps)}: {ratios} of the responses were cut at rollout.max_response_tokens="
                f"{self._cfg.rollout.max_response_tokens} (completions/clipped_ratio): rewards are computed on "
                "unfinished answers. Raise it, check that the model ends its answers with an EOS token, or set "
                "rollout.stop"))
        self._growing("logprob_gap", "rollout/logprob_diff_same_version", h.logprob_gap_warn, steps, recent, (
            "the learner and the engine disagree more every step on the same weights: check that the pushed "
            "weights reach the engine, and rollout.dtype against model.dtype"))
        self._growing("kl", "objective/kl", h.kl_warn, steps, recent, (
            "the policy runs away from the reference: raise algorithm.kl_coef, set algorithm.kl_target, or lower "
            "learner.lr"))
        start = first.get("policy/entropy_avg")
        if start and flat and all((m.get("policy/entropy_avg") or start) < h.entropy_collapse * start for m in recent):
            self._warn("entropy", (
                f"steps {_steps(steps)}: the policy's entropy fell to {recent[-1]['policy/entropy_avg']:.3g} from "
                f"{start:.3g} at the first step while the reward did not rise: it samples the same tokens and "
                "explores nothing. Lower learner.lr, raise algorithm.clip_high (clip-higher) or "
                "algorithm.entropy_coef, or try policy_loss clip_cov / kl_cov"))

    def _growing(self, cause: str, name: str, floor: float, steps: list[int], recent: list[dict[str, Any]],
                 fix: str) -> None:
        values = [m.get(name) for _, m in self._history[-(len(recent) + 1):]]
        if len(values) <= len(recent) or any(v is None for v in values):
            return
        if all(b > a for a, b in zip(values, values[1:], strict=False)) and values[-1] > floor:
            shown = ", ".join(f"{v:.3g}" for v in values)
            self._warn(cause, f"steps {_steps(steps)}: {name} grew every step ({shown}) past {floor:g}: {fix}")


def _all_unscorable(m: dict[str, Any]) -> bool:
    bad = sum(v for k, v in m.items() if k.startswith("reward/unscorable/"))
    return m.get("rollout/num_samples", 0.0) > 0 and bad >= m["rollout/num_samples"]

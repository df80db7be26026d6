"""Watching a run against the task: the best checkpoint by an evaluation metric, and the
over-optimisation guard.

Reward over-optimisation (Gao et al. 2022): a policy trained on a learned or partial reward
(the proxy) keeps raising it while the task's own checker (the gold) falls. `GoldWatch` sees
each evaluation; it says when one is the best so far (`checkpoint.keep_best`) and when the
guard must act (`guard.patience`): the gold has stayed below its best for `patience`
evaluations in a row while the proxy rose above its value at that best evaluation.

Its memory is the evaluations in `metrics.jsonl`, so a resumed run rebuilds it with `replay`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rlfleet.common.config_run import CheckpointConfig, GuardConfig


@dataclass(frozen=True)
class Verdict:
    """What one evaluation means."""

    best: bool
    """It is the best `checkpoint.keep_best` value so far: save and mark it."""
    act: str | None
    """Why the guard must act now (None: it need not)."""


class GoldWatch:
    def __init__(self, guard: GuardConfig, checkpoint: CheckpointConfig):
        self.guard = guard
        self.keep_best = checkpoint.keep_best
        self.sign = 1.0 if checkpoint.best_mode == "max" else -1.0
        self.best_value: float | None = None  # of keep_best
        self.gold_best: tuple[int, float, float] | None = None  # (step, gold, proxy there)
        self.below = 0  # evaluations in a row below the gold's best

    def replay(self, rows: Iterable[Mapping[str, Any]], upto: int) -> None:
        """Feed the evaluations logged before a resume (steps ≤ `upto`)."""
        for row in rows:
            if row["step"] <= upto:
                self.see(row["step"], row)

    def see(self, step: int, metrics: Mapping[str, Any]) -> Verdict:
        return Verdict(self._best(metrics), self._guard(step, metrics))

    def _best(self, metrics: Mapping[str, Any]) -> bool:
        value = _finite(metrics.get(self.keep_best)) if self.keep_best else None
        if value is None or (self.best_value is not None and self.sign * value <= self.sign * self.best_value):
            return False
        self.best_value = value
        return True

    def _guard(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        g = self.guard
        gold, proxy = _finite(metrics.get(g.gold)), _finite(metrics.get(g.proxy))
        if not g.patience or gold is None or proxy is None:
            return None
        if self.gold_best is None or gold > self.gold_best[1]:
            self.gold_best, self.below = (step, gold, proxy), 0
            return None
        best_step, best_gold, best_proxy = self.gold_best
        self.below = self.below + 1 if gold < best_gold - g.min_delta else 0
        if self.below < g.patience or proxy <= best_proxy:
            return None
        self.below = 0  # act once per `patience` evaluations
        return (f"over-optimisation: {g.gold} has stayed below its best ({best_gold:.4g} at step {best_step}) "
                f"for {g.patience} evaluations and is now {gold:.4g}, while {g.proxy} rose from "
                f"{best_proxy:.4g} to {proxy:.4g}")


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

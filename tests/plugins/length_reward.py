"""A new reward source, whole: the response's length in characters, scaled, capped; no value
(unscorable) for an empty response. `plugins: [tests.plugins.length_reward]` and
`reward.sources: [{name: length, kwargs: {per_char: 0.1}}]` select it."""

from rlfleet.common.registry import REWARD_SOURCES
from rlfleet.services.reward_sources import Component, ScoringBatch


@REWARD_SOURCES.register("length")
class LengthReward:
    def __init__(self, weight: float = 1.0, per_char: float = 0.1, cap: float = 1.0):
        self._weight, self._per_char, self._cap = weight, per_char, cap

    def score(self, batch: ScoringBatch) -> list[Component]:
        values = [min(self._cap, self._per_char * len(r)) if r else None for r in batch.responses]
        reasons = [None if v is not None else "empty" for v in values]
        return [Component("length", self._weight, values, reasons)]

    def close(self) -> None:
        pass

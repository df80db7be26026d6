"""Reward sums and the reward model's score normalisation, on the learner's side.

The reward service is stateless: it returns each source's own value (the reward model's raw
score among them) and their weighted sum. The learner owns the normalisation of the reward
model's score (`reward.normalize`, `reward.clip`): `RewardScaler` folds each trained batch into
the running statistics, normalises and clips the model's values, and sums the sources again in
the service's order. Its state is part of the learner's checkpoint, so a restarted reward
service needs nothing back and a resumed run continues the same statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

MODEL = "model"
"""The reward model's component name in a score batch."""


def weighted_sum(components: Mapping[str, Sequence[float | None]], weights: Mapping[str, float],
                 reasons: Sequence[str | None]) -> list[float | None]:
    """Σ weight × value over the sources (in the components' order) per response; None where
    the response is unscorable (`reasons`)."""
    return [
        None if reasons[i] is not None
        else sum(weights[name] * values[i] for name, values in components.items())  # type: ignore[operator]
        for i in range(len(reasons))
    ]


class ScoreNormalizer:
    """Optional normalisation ('running' mean/std, or 'fixed' mean/std) then clipping."""

    def __init__(self, mode: str = "none", mean: float = 0.0, std: float = 1.0, clip: float | None = None):
        self.mode, self.mean, self.std, self.clip = mode, mean, std, clip
        self._count, self._m2 = 0, 0.0
        if mode == "running":
            self.mean, self.std = 0.0, 1.0

    @property
    def active(self) -> bool:
        return self.mode != "none" or self.clip is not None

    def __call__(self, scores: Sequence[float], update: bool = True) -> list[float]:
        """Normalise (after folding this batch into the running statistics, if `update`) and clip."""
        finite = [s for s in scores if math.isfinite(s)]
        if self.mode == "running" and finite and update:
            self._update(finite)
        out = list(scores)
        if self.mode != "none":
            out = [(s - self.mean) / max(self.std, 1e-8) for s in out]
        if self.clip is not None:
            out = [min(max(s, -self.clip), self.clip) if math.isfinite(s) else s for s in out]
        return out

    def _update(self, batch: list[float]) -> None:
        """Chan et al.'s parallel update of count, mean and M2 by a batch."""
        n_b = len(batch)
        mean_b = sum(batch) / n_b
        m2_b = sum((x - mean_b) ** 2 for x in batch)
        total = self._count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self._m2 += m2_b + delta**2 * self._count * n_b / total
        self._count = total
        self.std = math.sqrt(self._m2 / (total - 1)) if total > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "count": self._count, "m2": self._m2}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.mean, self.std = state["mean"], state["std"]
        self._count, self._m2 = int(state["count"]), state["m2"]


class RewardScaler:
    """The scores a learner trains on: the service's sums with the reward model's component
    normalised and clipped (unchanged when the run has no reward model or no normalisation)."""

    def __init__(self, mode: str = "none", mean: float = 0.0, std: float = 1.0, clip: float | None = None):
        self.normalizer = ScoreNormalizer(mode, mean, std, clip)

    @classmethod
    def of(cls, reward: Any) -> RewardScaler:
        """From a `RewardConfig`."""
        return cls(reward.normalize, reward.norm_mean, reward.norm_std, reward.clip)

    def __call__(self, scores: Sequence[float | None], components: Mapping[str, Sequence[float | None]] | None,
                 weights: Mapping[str, float] | None, update: bool = True) -> list[float | None]:
        """`scores` with the model's component (raw in `components`) normalised; `update`
        folds the batch's finite raw scores into the running statistics first."""
        if not self.normalizer.active or not components or MODEL not in components:
            return list(scores)
        raw = components[MODEL]
        normed = self.normalizer([math.nan if v is None else v for v in raw], update=update)
        parts = {name: ([None if v is None else n for v, n in zip(raw, normed, strict=True)] if name == MODEL
                        else values) for name, values in components.items()}
        reasons = [None if s is not None else "unscorable" for s in scores]
        return weighted_sum(parts, weights or {}, reasons)

    def state_dict(self) -> dict[str, float]:
        return self.normalizer.state_dict()

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        if state:
            self.normalizer.load_state_dict(state)

"""KL penalty estimators and KL-coefficient controllers.

Estimators from J. Schulman, "Approximating KL Divergence" (2020), with
Δ = logπ − logπ_ref per sampled token (samples drawn from π):
  k1 = Δ                        unbiased, can be negative
  k2 = ½Δ²                      biased, low variance
  k3 = exp(−Δ) − 1 + Δ          unbiased and ≥ 0
  abs = |Δ|
For k3 only, Δ is clamped to ±20 and the value to [0, 10] so that a single token far off
the reference cannot produce an inf or a huge gradient. A `+` suffix (k1+, k2+, k3+, abs+)
keeps the estimator's value but takes the gradient of ½Δ² (straight-through: the k2
gradient is unbiased for the KL's, whichever estimator is logged). verl's names kl, mse and
low_var_kl are accepted for k1, k2 and k3.

Adaptive controller: Ziegler et al., "Fine-Tuning Language Models from Human Preferences"
(2019): e = clip(KL/target − 1, −0.2, 0.2), β ← β·(1 + e·n/horizon), n = responses in the step.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+"]
KL_ESTIMATORS: tuple[str, ...] = KLEstimator.__args__  # type: ignore[attr-defined]
_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token KL estimate [B, T] of π against π_ref from log-probs of the sampled tokens."""
    if estimator.endswith("+") and estimator[:-1] in KL_ESTIMATORS + tuple(_ALIASES):
        value = _estimate(logprobs, ref_logprobs, estimator[:-1]).detach()
        half_square = 0.5 * (logprobs - ref_logprobs).square()
        return value + (half_square - half_square.detach())
    return _estimate(logprobs, ref_logprobs, estimator)


def _estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    estimator = _ALIASES.get(estimator, estimator)
    delta = logprobs - ref_logprobs
    if estimator == "abs":
        return delta.abs()
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator == "k3":
        delta = delta.clamp(-20.0, 20.0)
        # expm1 avoids the cancellation of exp(−Δ) − 1 at tiny Δ, which goes negative; the
        # true value is ≥ 0, so the lower clamp is 0 (a −10 bound could never bind).
        return (torch.expm1(-delta) + delta).clamp(0.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """β adapted towards a target KL (Ziegler et al. 2019); β is part of the checkpoint."""

    def __init__(self, init_value: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0 (got {target}, {horizon})")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β after a step whose mean KL was `current_kl`, over `n_steps` responses."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])

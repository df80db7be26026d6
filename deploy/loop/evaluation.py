"""Evaluation: greedy responses to the held-out prompts, scored by the training reward (the
proxy) and, when the run has one, the gold checker."""

from __future__ import annotations

from rlfleet.common.config import RunConfig
from rlfleet.common.data import PromptDataset
from rlfleet.common.reward_scale import MODEL
from rlfleet.deploy.actors.parts import EvalParts, Parts
from rlfleet.deploy.loop import episodes
from rlfleet.deploy.loop.stages import sampling_spec


def evaluate(cfg: RunConfig, parts: Parts | EvalParts, data: PromptDataset, step: int = 0) -> dict[str, float]:
    """Greedy responses to the first `data.eval_size` held-out prompts, scored by the training
    reward (`eval/reward`, the proxy, normalised as `parts.scale` says; with a reward model also
    its raw score, `eval/reward_model`) and, when the run has one, the gold checker (`eval/gold`)."""
    examples = data.examples[: cfg.data.eval_size]
    if cfg.environment.enabled:
        return episodes.evaluate_episodes(cfg, parts.pool, examples, sampling_spec(cfg, step, greedy=True))
    batch = parts.pool.generate([e.prompt_ids for e in examples], sampling_spec(cfg, step, greedy=True))
    rollouts = batch.rollouts
    args = ([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
            [examples[r.prompt_index].extra for r in rollouts])
    scored = parts.reward.scores(parts.reward.score(*args))
    scores = parts.scale.scale_scores(scored)
    out = {
        **_mean_of(scores, "eval/reward", "eval/unscorable"),
        "eval/mean_length": sum(len(r.response_ids) for r in rollouts) / max(len(rollouts), 1),
        "eval/num_prompts": float(len(rollouts)),
    }
    raw = [v for v in scored.components.get(MODEL, []) if v is not None]
    if raw:
        out["eval/reward_model"] = sum(raw) / len(raw)
    if parts.gold:
        gold = parts.reward.gold(*args)
        out.update(_mean_of(gold, "eval/gold", "eval/gold_unscorable"))
    return out


def _mean_of(values: list[float | None], key: str, unscorable_key: str) -> dict[str, float]:
    """The mean of the scorable values, and how many were not scorable."""
    good = [v for v in values if v is not None]
    return {key: sum(good) / len(good) if good else float("nan"), unscorable_key: float(len(values) - len(good))}

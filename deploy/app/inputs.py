"""A run's inputs, resolved from its config before any actor starts: the initial policy (the
tiny model built into the run folder when no path is given), the prompt data, and the reward
sources and gold checker (a built-in task brings its own rule: `RunConfig.task_checker`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rlfleet.common.config import RewardConfig, RuleRewardConfig, RunConfig
from rlfleet.common.data import PromptDataset, build_dataset, read_rows
from rlfleet.common.tasks import build_task
from rlfleet.common.tiny_models import build_tiny_causal_lm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunData:
    train: PromptDataset
    eval: PromptDataset


def policy_path(cfg: RunConfig, run_dir: Path) -> str:
    """The initial policy: `model.path`, or the tiny model built (once) into the run folder."""
    if cfg.model.path is not None:
        return cfg.model.path
    out = run_dir / "models" / "policy"
    if not (out / "config.json").exists():
        build_tiny_causal_lm(out, seed=cfg.seed, shape=cfg.model.tiny)
    return str(out)


def reward_config(cfg: RunConfig) -> RewardConfig:
    """The reward sources; a built-in task with no other source brings its own rule."""
    r = cfg.reward
    if r.configured_sources() or not cfg.task_checker:
        return r
    rule = build_task(cfg.data.task, cfg.seed, 1).rule
    return r.model_copy(update={"rules": [RuleRewardConfig(function=rule)]})


def reward_fields(cfg: RunConfig) -> list[tuple[str, RuleRewardConfig]]:
    """Every rule function the run will call, with the config field that names it."""
    own = cfg.reward.rules or reward_config(cfg).rules
    field = "reward.rules" if cfg.reward.rules else "data.task's rule"
    out = [(f"{field}[{i}].function" if cfg.reward.rules else field, rule) for i, rule in enumerate(own)]
    return out + [(f"data.eval_reward[{i}].function", rule) for i, rule in enumerate(cfg.data.eval_reward or [])]


def gold_rules(cfg: RunConfig) -> list[RuleRewardConfig]:
    """The gold checker: `data.eval_reward`, else a built-in task's own rule, else none."""
    if cfg.data.eval_reward is not None:
        return list(cfg.data.eval_reward)
    if cfg.task_checker:
        return [RuleRewardConfig(function=build_task(cfg.data.task, cfg.seed, 1).rule)]
    return []


def load_data(cfg: RunConfig, tokenizer) -> RunData:
    d = cfg.data

    def dataset(path: str | None, split: str, size: int) -> PromptDataset:
        rows = read_rows(path, d.train_split if split == "train" else d.eval_split) if path is not None else [
            (f"task {d.task} {split} #{i}", row) for i, row in enumerate(build_task(d.task, cfg.seed, size, split).rows)
        ]
        data = build_dataset(rows, tokenizer, d.prompt_key, d.max_prompt_tokens, d.on_long_prompt,
                             source=path or f"task {d.task}", data_format=d.format if path else "rlfleet",
                             label_key=d.label_key, apply_chat_template=d.apply_chat_template,
                             template_kwargs=d.chat_template_kwargs)
        if data.dropped_too_long:
            logger.warning("%s: dropped %d prompts longer than data.max_prompt_tokens=%d",
                           data.source, data.dropped_too_long, d.max_prompt_tokens)
        return data

    train = dataset(d.train_path, "train", d.task_size)
    if d.eval_path is not None or d.train_path is None:
        evaluation = dataset(d.eval_path, "test", d.eval_size)
    else:
        evaluation = train
    return RunData(train, evaluation)

"""Checks of a run's inputs before anything starts.

Every folder the config names must exist (and hold a model or tokenizer), every data file
must exist, and every `package.module:function` must import with the right signature. A
failure raises `ConfigError` (the CLI exits with code 2) naming each field at fault — before
Ray, vLLM or any model starts, and before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from rlfleet.common.config import RuleRewardConfig, RunConfig
from rlfleet.common.config_io import ConfigError
from rlfleet.common.environment import EnvironmentLoadError, load_environment
from rlfleet.rollout.backends import capability_problems
from rlfleet.services.reward_styles import ACCEPTED
from rlfleet.services.rule_probe import probe_rule
from rlfleet.services.rules import RuleOutcome, load_rule
from rlfleet.services.sandbox import import_path
from rlfleet.services.tools import tool_schema


def folder_problem(field: str, path: str | None, marker: str | None = "config.json") -> str | None:
    """Why `path` (the value of `field`) is not a usable folder; None when it is (or is unset)."""
    if path is None:
        return None
    folder = Path(path)
    if not folder.exists():
        return f"{field}={path!r}: the folder does not exist"
    if not folder.is_dir():
        return f"{field}={path!r}: not a folder"
    if marker is not None and not (folder / marker).is_file():
        return f"{field}={path!r}: not a model folder (no {marker} in it)"
    return None


def check_inputs(cfg: RunConfig, stage: str | None = None, checkpoint: str | None = None) -> None:
    """Raise `ConfigError` listing every input of this run that cannot be used.

    `stage` (sft, rm, dpo) adds that stage's `init_from` and `data_path`; `checkpoint` is
    the `--checkpoint` of `rlfleet eval`."""
    problems = [
        folder_problem("model.path", cfg.model.path),
        folder_problem("model.tokenizer_path", cfg.model.tokenizer_path, marker=None),
        folder_problem("reward.model_path", cfg.reward.model_path),
        _file_problem("data.train_path", cfg.data.train_path),
        _file_problem("data.eval_path", cfg.data.eval_path),
    ]
    if stage is not None:
        section = getattr(cfg, stage)
        problems += [folder_problem(f"{stage}.init_from", section.init_from),
                     folder_problem(f"{stage}.sample_from", section.sample_from),
                     _file_problem(f"{stage}.data_path", section.data_path)]
    if checkpoint is not None:
        problems.append(folder_problem("--checkpoint", checkpoint, marker=None))
    for i, rule in enumerate(cfg.reward.rules):
        try:
            load_rule(rule.function, f"reward.rules[{i}].function", rule.style)
        except ValueError as err:
            problems.append(str(err))
    problems += _environment_problems(cfg)
    problems += capability_problems(cfg)
    found = [p for p in problems if p is not None]
    if found:
        raise ConfigError("; ".join(found) if len(found) == 1 else "\n  " + "\n  ".join(found))


def _file_problem(field: str, path: str | None) -> str | None:
    """A data path: a file, or a `datasets` folder."""
    if path is None or Path(path).exists():
        return None
    return f"{field}={path!r}: no such file or folder"


def _environment_problems(cfg: RunConfig) -> list[str]:
    """The environment class and every tool import, with the interface they need."""
    env = cfg.environment
    if not env.enabled:
        return []
    problems = []
    try:
        load_environment(env.class_path, "environment.path")
    except EnvironmentLoadError as err:
        problems.append(str(err))
    for i, path in enumerate(env.tool_paths):
        try:
            tool_schema(import_path(path))
        except (ImportError, AttributeError, ValueError) as err:
            problems.append(f"environment.tools[{i}]={path!r}: {err}")
    return problems


DRY_RESPONSE = "0"
"""The placeholder response of a reward rule's dry call."""


def dry_call_rules(rules: list[tuple[str, RuleRewardConfig]], prompt: str, extra: dict) -> None:
    """Call each (field, rule) once, in its style, in a fresh interpreter, with the first training
    row's `prompt` and `extra` and the response DRY_RESPONSE; raise `ConfigError` naming every
    rule that raised, hung, crashed or returned something other than its style promises."""
    problems = []
    for field, rule in rules:
        try:
            style = load_rule(rule.function, field, rule.style)
        except ValueError as err:
            problems.append(str(err))
            continue
        outcome = probe_rule(rule.function, prompt, DRY_RESPONSE, extra, rule.timeout_s, style)
        what = _failure(outcome, field, rule.timeout_s)
        if what is not None:
            problems.append(f"{field}={rule.function!r}: {what}, when called once before the run as {_as(style)} with "
                            f"prompt={_short(prompt)}, response={DRY_RESPONSE!r}, extra with keys {sorted(extra)} "
                            f"(the first training row). {ACCEPTED}")
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "\n  " + "\n  ".join(problems))


def _as(style: str) -> str:
    return {"rlfleet": "fn(prompt, response, extra)", "verl": "a verl-style compute_score",
            "trl": "a TRL-style batch function (a batch of one)",
            "openrlhf": "an OpenRLHF-style reward_func (a batch of one)"}[style]


def _failure(outcome: RuleOutcome, field: str, timeout_s: float) -> str | None:
    """What went wrong with a dry call, in words; None when its style's promise was kept."""
    if outcome.reason in (None, "none"):
        return None
    if outcome.reason == "raised":
        return f"it raised {outcome.detail}"
    if outcome.reason == "timeout":
        return f"it did not return within {timeout_s:g} s ({field.rsplit('.', 1)[0]}.timeout_s)"
    if outcome.reason == "crashed":
        return f"its process died ({outcome.detail})"
    return f"it {outcome.detail}, not a number"


def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")

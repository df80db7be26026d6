"""Reward code as users already wrote it, run unmodified: the calling conventions of verl, TRL
and OpenRLHF beside rlfleet's own, told apart by the function's signature (or forced with
`reward.rules[i].style`).

    rlfleet   fn(prompt: str, response: str, extra: dict) -> float | None          one response a call
    verl      compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw)
              -> float | dict (its 'score' is the reward; other numeric keys are logged)
                                                                                  one response a call
    trl       fn(prompts, completions, completion_ids=..., **columns) -> list[float | None]
              (message lists for a conversational dataset)                        the batch in one call
    openrlhf  reward_func(queries, prompts, labels) -> tensor | list | dict(rewards=..., extra_logs=...)
                                                                                  the batch in one call

What each receives, from a data row (its fields as they are, `extra`):
- verl: `data_source` and `extra_info` from the row, `ground_truth` from
  `reward_model.ground_truth` (verl's parquet), else `ground_truth`, else `answer`;
- TRL: `prompts` the rows' `prompt` fields as they are (text, or message lists — then
  `completions` are `[{"role": "assistant", "content": text}]` lists), every other column as a
  list, `completion_ids` the response token ids;
- OpenRLHF: `queries` prompt + response text, `prompts` the prompt text, `labels` the row's
  `label` (`data.label_key` sets which field that is).

The adapters below run in the rule processes (`services/sandbox.py`), so this module imports no
torch; an OpenRLHF tensor is read through its `tolist()`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

STYLES = ("rlfleet", "verl", "trl", "openrlhf")
BATCH_STYLES = frozenset({"trl", "openrlhf"})
ADAPTER = "rlfleet.services.reward_styles:call"
"""The path the rule processes call for the verl, TRL and OpenRLHF styles."""

ACCEPTED = ("rlfleet accepts a reward function in one of these styles (detected from its parameter names, or set "
            "reward.rules[i].style): rlfleet fn(prompt, response, extra) -> float | None; verl "
            "compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict with 'score'; "
            "TRL fn(prompts, completions, **kwargs) -> list[float | None]; OpenRLHF reward_func(queries, prompts, "
            "labels) -> tensor | dict with 'rewards'")


class Scored(NamedTuple):
    """A value with named numbers to log beside it (a verl dict's other keys, OpenRLHF's
    extra_logs)."""

    value: Any
    logs: dict[str, float]


def detect_style(fn: Callable[..., Any]) -> str | None:
    """The style `fn`'s signature says, or None when it fits none."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    names = set(params)
    if {"data_source", "solution_str", "ground_truth"} <= names:
        return "verl"
    if "completions" in names:
        return "trl"
    if {"queries", "prompts", "labels"} <= names:
        return "openrlhf"
    try:
        inspect.signature(fn).bind("prompt", "response", {})
    except TypeError:
        return None
    return "rlfleet"


def ground_truth(extra: Mapping[str, Any]) -> Any:
    """verl's ground truth of a row: `reward_model.ground_truth`, else `ground_truth`, else `answer`."""
    model = extra.get("reward_model")
    if isinstance(model, Mapping) and "ground_truth" in model:
        return model["ground_truth"]
    for key in ("ground_truth", "answer"):
        if key in extra:
            return extra[key]
    raise KeyError("no ground truth in the row: verl-style rules read reward_model.ground_truth (or a "
                   f"'ground_truth' or 'answer' field); the row has {sorted(extra)}")


def call(path: str, style: str, *args: Any) -> Any:
    """Run `path` in `style` (in a rule process): one response for verl
    (prompt, response, extra), the batch for TRL and OpenRLHF (prompts, responses, extras,
    response_ids)."""
    from rlfleet.services.sandbox import import_path

    fn = import_path(path)
    if style == "verl":
        _, response, extra = args
        value = fn(data_source=extra.get("data_source"), solution_str=response, ground_truth=ground_truth(extra),
                   extra_info=extra.get("extra_info"))
        return _verl_value(value)
    prompts, responses, extras, response_ids = args
    if style == "trl":
        return _trl(fn, prompts, responses, extras, response_ids)
    if style == "openrlhf":
        return _openrlhf(fn, prompts, responses, extras)
    raise ValueError(f"unknown reward style {style!r}; styles: {STYLES}")


def _verl_value(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    if "score" not in value:
        raise ValueError(f"returned a dict without 'score' (keys {sorted(value)})")
    return Scored(value["score"], _numbers(value, skip="score"))


def _numbers(values: Mapping[str, Any], skip: str = "") -> dict[str, float]:
    out = {}
    for key, v in values.items():
        v = _plain(v)
        if key != skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[str(key)] = float(v)
        elif key != skip and isinstance(v, bool):
            out[str(key)] = float(v)
    return out


def _plain(value: Any) -> Any:
    """A tensor or array as Python numbers (without importing torch)."""
    return value.tolist() if hasattr(value, "tolist") else value


def _trl(fn, prompts, responses, extras, response_ids) -> list[Any]:
    raw = [e.get("prompt", p) for p, e in zip(prompts, extras, strict=True)]  # TRL's datasets name it 'prompt'
    prompt_key = "prompt"
    conversational = all(isinstance(p, list) for p in raw)
    completions = [[{"role": "assistant", "content": r}] for r in responses] if conversational else list(responses)
    columns = sorted({k for e in extras for k in e if k != prompt_key})
    kwargs = {k: [e.get(k) for e in extras] for k in columns if k not in ("prompts", "completions", "completion_ids")}
    values = fn(prompts=raw if conversational else list(prompts), completions=completions,
                completion_ids=[list(ids) for ids in response_ids], **kwargs)
    return _per_response(_plain(values), len(responses))


def _openrlhf(fn, prompts, responses, extras) -> list[Any]:
    queries = [p + r for p, r in zip(prompts, responses, strict=True)]
    labels = [e.get("label") for e in extras]
    out = fn(queries, list(prompts), labels)
    if isinstance(out, Mapping):
        if "rewards" not in out and "scores" not in out:
            raise ValueError(f"returned a dict without 'rewards' (keys {sorted(out)})")
        values = _per_response(_plain(out.get("rewards", out.get("scores"))), len(responses))
        logs = out.get("extra_logs") or {}
        per_item = {k: _plain(v) for k, v in logs.items()}
        return [Scored(v, {k: float(x[i]) if isinstance(x, list) else float(x)
                           for k, x in per_item.items() if isinstance(x, (list, int, float))})
                for i, v in enumerate(values)]
    return _per_response(_plain(out), len(responses))


def _per_response(values: Any, n: int) -> list[Any]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        shown = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"returned {shown} for a batch of {n} responses (one value per response expected)")
    return list(values)


def batch_call_args(prompts: Sequence[str], responses: Sequence[str], extras: Sequence[Mapping[str, Any]],
                    response_ids: Sequence[Sequence[int]] | None) -> tuple:
    """The arguments of one batch-style `call` (after path and style)."""
    ids = [list(r) for r in response_ids] if response_ids is not None else [[] for _ in responses]
    return (list(prompts), list(responses), [dict(e) for e in extras], ids)

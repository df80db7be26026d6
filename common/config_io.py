"""Load a `RunConfig` from YAML plus dotted overrides, with errors that name field, file and line.

    cfg = load_config("run.yaml", ["learner.lr=1e-6", "rollout.num_workers=2"])

Any problem — unreadable file, YAML syntax, wrong type, out-of-range value, unknown key,
violated cross-field rule — raises `ConfigError`, whose message lists every problem as
`field.path (file:line): reason`; an unknown key also gets the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlfleet.common.config import RunConfig

Loc = tuple[str | int, ...]
_NAMED_FIELD = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)")


class ConfigError(ValueError):
    """Bad configuration input; the message says which field and why. CLIs exit with code 2."""

    exit_code = 2


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None
) -> RunConfig:
    """Read `path` (YAML mapping; None means all defaults), apply `key.path=value` overrides, validate.

    `base` (e.g. the demo's defaults) sits under the file: the file's keys replace its keys."""
    tree: dict[str, Any] = copy.deepcopy(base) if base else {}
    lines: dict[Loc, int] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        read, lines = _read_yaml(Path(path))
        _merge(tree, read)
    overridden: dict[Loc, str] = {}
    for item in overrides:
        loc = _apply_override(tree, item)
        overridden[loc] = item
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, lines, overridden)) from None


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain dict (the Python API), with the same error messages as the YAML path."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, {}, {})) from None


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML; `load_config` of this text gives back an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, int]]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot be read ({err.strerror})") from None
    try:
        tree = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"config file {where}: invalid YAML: {problem}") from None
    if tree is None:
        return {}, {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"config file {path}: the top level must be a mapping of sections, got {type(tree).__name__}"
        )
    lines: dict[Loc, int] = {}
    _key_lines(node, (), lines)
    return tree, lines


def _key_lines(node: yaml.Node, prefix: Loc, out: dict[Loc, int]) -> None:
    """Record the 1-based line of every mapping key (and list item) under `node`."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            loc = (*prefix, key_node.value)
            out[loc] = key_node.start_mark.line + 1
            _key_lines(value_node, loc, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*prefix, i)] = item.start_mark.line + 1
            _key_lines(item, (*prefix, i), out)


def _apply_override(tree: dict[str, Any], item: str) -> Loc:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected key.path=value (e.g. learner.lr=1e-6)")
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override '{item}': {where} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw
    return tuple(parts)


def _format_errors(
    err: ValidationError, source: str, lines: dict[Loc, int], overridden: dict[Loc, str]
) -> str:
    problems = [_describe(e, source, lines, overridden) for e in err.errors()]
    head = f"invalid config ({source}): {len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return "\n".join([head, *(f"  - {p}" for p in problems)])


def _describe(e: Any, source: str, lines: dict[Loc, int], overridden: dict[Loc, str]) -> str:
    loc: Loc = tuple(e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    named = _NAMED_FIELD.match(msg) if e["type"] == "value_error" else None
    if named:
        # A cross-field rule names the field to change at the start of its message.
        loc = tuple(named.group(1).split("."))
        return f"{msg}{_where(loc, source, lines, overridden)}"
    field = ".".join(str(p) for p in loc) or "<top level>"
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        if close:
            msg += f"; did you mean '{close[0]}'?"
        elif valid:
            msg += f"; valid keys here: {', '.join(valid)}"
    elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
        msg += f" (got {e['input']!r})"
    return f"{field}{_where(loc, source, lines, overridden)}: {msg}"


def _where(loc: Loc, source: str, lines: dict[Loc, int], overridden: dict[Loc, str]) -> str:
    """Where the value at `loc` (or the nearest section above it) came from."""
    below = [item for o, item in overridden.items() if o[: len(loc)] == loc]
    if below:
        return f" (override '{below[-1]}')"
    for n in range(len(loc), 0, -1):
        if loc[:n] in overridden:
            return f" (override '{overridden[loc[:n]]}')"
        if loc[:n] in lines:
            return f" ({source}:{lines[loc[:n]]})"
    return ""


def _valid_keys(loc: Loc) -> list[str]:
    model = _model_at(RunConfig, loc)
    return list(model.model_fields) if model is not None else []


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The section class that the path `loc` points into (list indices and Optionals unwrapped)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        if current is None or part not in current.model_fields:
            return None
        current = _first_model(current.model_fields[part].annotation)
    return current


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _first_model(arg)
            if found is not None:
                return found
    return None

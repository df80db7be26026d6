"""An environment host: a Ray actor that plays many episodes of one environment class.

Rollout workers hold the hosts' handles and drive the turn loop (`rollout/episodes.py`):
`reset` opens episodes (one environment instance each, by key), `step` answers the model's
turns, `close` forgets them. A host holds episode state, so it is the one part of an agentic
run that is not stateless: when it dies, Ray restarts it empty and the workers re-run the
episodes it held from their start (none lost, none counted twice).

The environment's tools, if the run names any, run in a `ToolBox` the host owns: separate
processes under time and memory limits, so a bad tool call cannot take the host down.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rlfleet.common.environment import Message, Step, load_environment
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.services.tools import ToolBox


class EnvironmentHost:
    """Episodes of `path` (`package.module:Class`), built with `kwargs` (and `toolbox=` when the
    class takes one and the run names tools)."""

    def __init__(self, path: str, kwargs: Mapping[str, Any] | None = None, tools: Sequence[str] = (),
                 tool_timeout_s: float = 5.0, tool_memory_mb: int | None = 512, tool_processes: int = 1,
                 threads: ThreadBudget | None = None):
        apply_thread_budget(threads)
        self._cls = load_environment(path, "environment.path")
        self._kwargs = dict(kwargs or {})
        self._toolbox = ToolBox(tools, tool_timeout_s, tool_memory_mb, tool_processes) if tools else None
        if self._toolbox is not None and "toolbox" in inspect.signature(self._cls).parameters:
            self._kwargs["toolbox"] = self._toolbox
        self._episodes: dict[str, Any] = {}

    def health(self) -> int:
        """The host's process id (answers once the host is up)."""
        return os.getpid()

    def tools(self) -> list[dict[str, Any]]:
        """The JSON schemas of the run's tools, for the chat template (`tools=`)."""
        return list(self._toolbox.schemas) if self._toolbox is not None else []

    def reset(self, keys: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> list[list[Message]]:
        """Open one episode per key; each one's opening messages."""
        out = []
        for key, example in zip(keys, examples, strict=True):
            env = self._cls(**self._kwargs)
            self._episodes[key] = env
            out.append(env.reset(example))
        return out

    def step(self, keys: Sequence[str], texts: Sequence[str]) -> list[Step]:
        """The environment's answer to each episode's latest model turn."""
        return [self._episode(key).step(text) for key, text in zip(keys, texts, strict=True)]

    def close(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._episodes.pop(key, None)

    def open_episodes(self) -> int:
        return len(self._episodes)

    def _episode(self, key: str) -> Any:
        env = self._episodes.get(key)
        if env is None:
            raise KeyError(f"this environment host has no episode {key!r} (it restarted, or the episode was closed)")
        return env

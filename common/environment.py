"""The environment interface of multi-turn RL: plain classes, in-process or as Ray actors.

An environment plays one episode per example:

    env = MyEnv()
    messages = env.reset(example)            # the conversation so far: [{"role", "content"}, ...]
    step = env.step(response_text)           # the model's turn → Step
    while not step.done: ...                 # step.observation: messages to append (a tool's
                                             # output, the game's feedback), then the model again

`Step.reward` is this turn's reward; the episode's score is their sum (or each turn's reward
at that turn's last token, where the run asks for it). `info` carries anything to log (e.g.
`{"tool_error": "timeout"}`). An environment holds the state of one episode: the rollout side
makes one per episode (or resets one between episodes), so `reset` must clear it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]


@dataclass(frozen=True)
class Step:
    """What the environment answers to one model turn."""

    observation: list[Message] | None
    """Messages to append before the model's next turn (None: nothing, e.g. when done)."""
    reward: float = 0.0
    """This turn's reward."""
    done: bool = False
    """The episode is over (the model gets no further turn)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything to report (a tool error's kind, the number of guesses, ...)."""


@runtime_checkable
class Environment(Protocol):
    def reset(self, example: Mapping[str, Any]) -> list[Message]:
        """Start an episode for one dataset example; the opening messages."""
        ...

    def step(self, response_text: str) -> Step:
        """The model's turn (its text, as generated) → the environment's answer."""
        ...


class EnvironmentLoadError(ValueError):
    """A configured environment cannot be loaded or does not implement the interface."""


def load_environment(path: str, field_name: str) -> type:
    """The class `package.module:Class` named by config field `field_name`, checked to have
    `reset(example)` and `step(response_text)`; errors name the field and what is wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise EnvironmentLoadError(f"{field_name}={path!r}: expected 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise EnvironmentLoadError(f"{field_name}={path!r}: cannot import {module_name!r} ({err})") from err
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise EnvironmentLoadError(f"{field_name}={path!r}: {module_name} has no class {attr!r}")
    for method, params in (("reset", 1), ("step", 1)):
        fn = getattr(cls, method, None)
        if not callable(fn):
            raise EnvironmentLoadError(f"{field_name}={path!r}: {attr} has no method {method}()")
        if len(inspect.signature(fn).parameters) - 1 != params:  # minus self
            raise EnvironmentLoadError(f"{field_name}={path!r}: {attr}.{method} must take exactly {params} "
                                    f"argument besides self, got {inspect.signature(fn)}")
    return cls

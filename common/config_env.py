"""The `environment` section: multi-turn episodes with an environment and its tools."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlfleet.common.config_base import Section

BUILTIN_ENVIRONMENTS = {
    "calculator": ("rlfleet.services.environments:CalculatorTask", ("rlfleet.services.tools:calculator",)),
    "guess_number": ("rlfleet.services.environments:GuessNumber", ()),
}
"""Short names of the built-in environments → (class, the tools they use)."""


class EnvironmentConfig(Section):
    """Multi-turn RL: each prompt is an episode played against an environment (`path`)."""

    path: str | None = None
    """The environment: a built-in name (`calculator`, `guess_number`) or `package.module:Class`
    with `reset(example) -> messages` and `step(response_text) -> Step`
    (`rlfleet.common.environment`); None: single-turn RL (one response per prompt)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment's constructor."""
    tools: list[str] = Field(default_factory=list)
    """Tools offered to the model, `package.module:function` (typed, with a docstring); a
    built-in environment brings its own when this is empty."""
    hosts: int = Field(1, ge=1)
    """Environment host actors (each plays many episodes; scaled like the rollout fleet)."""
    max_turns: int = Field(4, ge=1)
    """Most model turns per episode."""
    max_episode_tokens: int = Field(192, ge=1)
    """Most response tokens per episode, generated and observation tokens together (each turn
    gets at most `rollout.max_response_tokens` of them)."""
    reward_at: Literal["last", "turn"] = "last"
    """Where the turns' rewards enter the token rewards: their sum at the episode's last token
    ('last'), or each turn's at that turn's last generated token ('turn')."""
    tool_timeout_s: float = Field(5.0, gt=0)
    """Longest a tool call may run (it is cut and becomes a `timeout` error observation)."""
    tool_memory_mb: int | None = Field(512, ge=16)
    """Address space a tool call may add to its process (None: no limit)."""
    call_timeout_s: float = Field(120.0, gt=0)
    """Deadline of one call to an environment host (one turn of its episodes); past it the host
    is restarted and its episodes re-run from their start."""
    max_restarts: int = Field(3, ge=0)
    """Times one episode may be re-run from its start (its host died) before the call fails."""

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def class_path(self) -> str:
        """`package.module:Class` of the environment."""
        assert self.path is not None
        return BUILTIN_ENVIRONMENTS.get(self.path, (self.path,))[0]

    @property
    def tool_paths(self) -> list[str]:
        if self.tools or self.path not in BUILTIN_ENVIRONMENTS:
            return list(self.tools)
        return list(BUILTIN_ENVIRONMENTS[self.path][1])

    @model_validator(mode="after")
    def _path_shape(self) -> EnvironmentConfig:
        if self.path is not None and self.path not in BUILTIN_ENVIRONMENTS and ":" not in self.path:
            raise ValueError(f"environment.path={self.path!r}: expected a built-in name "
                             f"({', '.join(BUILTIN_ENVIRONMENTS)}) or 'package.module:Class'")
        bad = [t for t in self.tools if ":" not in t]
        if bad:
            raise ValueError(f"environment.tools: {bad[0]!r} is not 'package.module:function'")
        return self

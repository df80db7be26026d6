"""The reward section of `RunConfig`: its sources (a reward model, rules, a remote scorer,
sources registered by plugins), their normalisation and the unscorable policy
(`rlfleet.common.config` re-exports it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rlfleet.common.config_base import Section
from rlfleet.common.registry import RewardSourceName


class RuleRewardConfig(Section):
    """A rule-based reward function."""

    function: str = Field(pattern=r"^([A-Za-z_][\w.]*|[^:]+\.py):[A-Za-z_]\w*$")
    """`package.module:function`, or `path/to/file.py:function` (relative to the working directory)."""
    style: Literal["auto", "rlfleet", "verl", "trl", "openrlhf"] = "auto"
    """The function's calling convention: rlfleet's `fn(prompt, response, extra)`, verl's
    `compute_score(data_source, solution_str, ground_truth, extra_info)`, TRL's batch
    `fn(prompts, completions, **columns)` or OpenRLHF's `reward_func(queries, prompts, labels)`;
    `auto` tells them apart by parameter names. A batch style's `timeout_s` covers the batch's call."""
    weight: float = 1.0
    """Weight of this source in the summed reward."""
    timeout_s: float = Field(5.0, gt=0)
    """Per-call deadline."""


class RemoteRewardConfig(Section):
    """A remote HTTP scorer."""

    url: str = Field(pattern=r"^https?://")
    """Endpoint that takes a JSON batch and returns scores."""
    token_env: str | None = None
    """Environment variable holding a bearer token; None sends none."""
    weight: float = 1.0
    """Weight of this source in the summed reward."""
    timeout_s: float = Field(30.0, gt=0)
    """Per-request deadline."""
    max_retries: int = Field(3, ge=0)
    """Retries on timeouts and 5xx answers (4xx answers are never retried)."""


class RewardSourceConfig(Section):
    """A reward source registered by a plugin (`rlfleet.services.reward_sources`)."""

    name: RewardSourceName
    """Its registered name."""
    weight: float = 1.0
    """Weight of this source in the summed reward."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of its constructor."""


class RewardConfig(Section):
    """Reward sources, summed with weights."""

    model_path: str | None = None
    """Sequence-classification reward model folder; None uses no reward model."""
    model_weight: float = 1.0
    """Weight of the reward model's score."""
    rules: list[RuleRewardConfig] = []
    """Rule-based reward functions."""
    remote: RemoteRewardConfig | None = None
    """Remote scorer."""
    sources: list[RewardSourceConfig] = []
    """Reward sources registered by modules in `plugins`."""

    def configured_sources(self) -> list[str]:
        """The fields that set a reward source."""
        fields = ("model_path", "rules", "remote", "sources")
        return [f"reward.{name}" for name in fields if getattr(self, name)]
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per reward-model forward pass."""
    normalize: Literal["none", "running", "fixed"] = "none"
    """Normalisation of the reward model's score: running mean/std, or fixed norm_mean/norm_std."""
    norm_mean: float = 0.0
    """Mean subtracted with normalize='fixed'."""
    norm_std: float = Field(1.0, gt=0)
    """Standard deviation divided by with normalize='fixed'."""
    rule_processes: int = Field(2, ge=1)
    """Processes that run rule functions (a hung rule is killed with its process)."""
    clip: float | None = Field(None, gt=0)
    """Clip scores to [-clip, clip] after normalisation."""
    on_unscorable: Literal["drop_group", "fail"] = "drop_group"
    """What to do when a source cannot score a response."""
    max_failures: int = Field(8, ge=0)
    """With on_unscorable='fail': unscorable responses tolerated per step (their groups are
    dropped); one more fails the step."""

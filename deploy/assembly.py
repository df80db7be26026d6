"""Where roles become Ray actors: `ray.remote(cls).options(...)` with resources from the config."""

from __future__ import annotations

from typing import Any

import ray

from rlfleet.common.config import RoleResources, RolloutConfig
from rlfleet.rollout.vllm_worker import VLLMRolloutWorker


def actor_options(res: RoleResources, **extra: Any) -> dict[str, Any]:
    """Ray actor options for one role's resources."""
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.resources:
        opts["resources"] = dict(res.resources)
    opts.update(extra)
    return opts


def start_vllm_worker(
    model_path: str, rollout: RolloutConfig, resources: RoleResources, seed: int = 0
) -> ray.actor.ActorHandle:
    """Start one vLLM rollout worker as a Ray actor (the engine builds in its constructor)."""
    cls = ray.remote(VLLMRolloutWorker).options(**actor_options(resources))
    return cls.remote(model_path, rollout, seed)

"""The rollout backends (`rollout.backend`): importing this module registers the built-in ones
in `rlfleet.common.registry.ROLLOUT_BACKENDS`; a backend of your own registers itself when its
module is imported (list it in the config's `plugins`). What a backend implements:
`rlfleet.rollout.worker_info.RolloutWorker`."""

from __future__ import annotations

from rlfleet.common.config import RunConfig
from rlfleet.common.registry import ROLLOUT_BACKENDS
from rlfleet.rollout import hf_worker, vllm_worker  # noqa: F401 - each registers its backend
from rlfleet.rollout.worker_info import BackendCapabilities, RolloutWorker


def backend(name: str) -> type[RolloutWorker]:
    """The worker class registered as `name` (the error lists the registered names)."""
    return ROLLOUT_BACKENDS[name]


def capabilities(name: str) -> BackendCapabilities:
    return backend(name).capabilities


def capability_problems(cfg: RunConfig) -> list[str]:
    """What this run asks of its rollout backend that the backend cannot do, each naming the
    config fields."""
    name = cfg.rollout.backend
    can = capabilities(name)
    problems = []
    if cfg.rollout.partial_rollout and not can.interruptible:
        problems.append(f"rollout.partial_rollout=true needs a backend that takes a push between two engine "
                        f"steps; rollout.backend={name!r} cannot (vllm can)")
    if cfg.environment.enabled and not can.multi_turn:
        problems.append(f"environment.path={cfg.environment.path!r} needs a backend that runs multi-turn "
                        f"episodes (continuing from token ids in the engine); rollout.backend={name!r} cannot "
                        "(vllm can)")
    if cfg.rollout.sleep_between_steps and not can.sleep:
        problems.append(f"rollout.sleep_between_steps=true needs a backend that can sleep; rollout.backend={name!r} "
                        "cannot")
    return problems

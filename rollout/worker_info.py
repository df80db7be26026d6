"""What a rollout worker is: the protocol every backend implements, the capabilities it
declares, and what it says about itself.

A backend is one module: a class implementing `RolloutWorker`, with a `capabilities` class
attribute, registered under its name in `rlfleet.common.registry.ROLLOUT_BACKENDS`
(`rollout.backend`). The pool and the loop ask capabilities, never backend names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from rlfleet.common.config import RolloutConfig
from rlfleet.common.records import PromptInput, RolloutBatch, SamplingSpec
from rlfleet.common.threads import ThreadBudget


@dataclass(frozen=True)
class BackendCapabilities:
    """What a rollout backend can do beyond `RolloutWorker`'s required methods."""

    calls_at_once: int = 1
    """Generate calls one worker takes at once (> 1: they share one engine, continuous
    batching; the pool then sends one prompt group per call and streams finished groups)."""
    interruptible: bool = False
    """A push can land between two engine steps, running requests continuing on the new
    weights (`rollout.partial_rollout`)."""
    multi_turn: bool = False
    """`run_episodes`: multi-turn episodes against environment hosts (`environment.path`)."""
    sleep: bool = False
    """`sleep` frees the engine's memory (KV cache, weights) until `wake_up`."""
    lora_adapters: bool = False
    """Takes LoRA adapters instead of merged weights."""

    @property
    def streaming(self) -> bool:
        return self.calls_at_once > 1


@dataclass(frozen=True)
class WorkerInfo:
    """Identity and state of one rollout worker."""

    worker_id: str
    """Unique per constructor run: a restarted actor gets a new id."""
    backend: str
    """The engine it generates with ('vllm', 'hf', or a backend's own)."""
    pid: int
    """Process id of the actor (for diagnostics and fault-injection tests)."""
    policy_version: int
    """Version of the weights it holds (0 = the initial weights)."""
    threads: int = 1
    """Intra-op threads it generates with (its thread budget, rlfleet.common.threads)."""
    kv_cache_tokens: int | None = None
    """Tokens its KV cache holds (vLLM: blocks × block size, as the engine reported at start-up)."""
    node_id: str = ""
    """The Ray node it runs on (`ray_node_id()`; '' when unknown): when a worker fails and its
    node is dead, the pool goes on without it instead of waiting for a restart there."""


def ray_node_id() -> str:
    """The Ray node of the calling process ('' outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - diagnostics only
        return ""


class RolloutWorker(Protocol):
    """A rollout worker (a plain class; `deploy/` makes it a Ray actor). Its constructor takes
    `(model_path, config: RolloutConfig, seed, threads: ThreadBudget | None)`, and, when its
    capabilities say `multi_turn`, `(environment, env_hosts)` after them."""

    capabilities: ClassVar[BackendCapabilities]

    def __init__(self, model_path: str, config: RolloutConfig, seed: int = 0,
                 threads: ThreadBudget | None = None, *args: Any) -> None: ...

    def info(self) -> WorkerInfo:
        """Identity, process, the version it holds, its threads."""
        ...

    def policy_version(self) -> int:
        """The version of the weights it holds (0 after a (re)start)."""
        ...

    def generate(self, prompts: Sequence[PromptInput], spec: SamplingSpec) -> RolloutBatch:
        """`spec.n` responses per prompt, each with its token ids, processed log-probs, finish
        reason and the policy version that made it."""
        ...

    def receive_weights(self, sync: Any, version: int, rank_offset: int, *payload: Any) -> int:
        """Load a push of weight-sync method `sync` (`rlfleet.weight_sync`): run its `receive`
        on `payload` where the model lives, load what it yields; returns `version`."""
        ...

    def sleep(self) -> int | None:
        """Free memory until `wake_up` (a no-op where `capabilities.sleep` is false); the bytes
        freed where the backend measures them, else None."""
        ...

    def wake_up(self) -> None: ...

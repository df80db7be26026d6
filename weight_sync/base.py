"""What every weight-sync method implements, and what the learner lends it.

A method has three ends, all in its own module:
- the **sender**, built once in each learner rank from `LearnerWeights`; the driver reaches it
  through the learner's `weight_call` / `weight_stream` endpoints (an operation name and its
  arguments);
- the **source** (`WeightSource`), built by the driver for one version, which brings any list
  of rollout workers to that version (the pool uses it for a push and to re-sync a worker that
  was added or restarted);
- the **receiver**, run in the process that holds a worker's model (in each of vLLM's workers,
  one per tensor-parallel rank), turning the payload a worker was handed into (name, tensor)
  pairs named as in the HF checkpoint.
Methods are registered by name in `rlfleet.common.registry.WEIGHT_SYNC` (`rollout.weight_sync`);
the method object itself travels to the actors (pickled by reference to its module), so a
method registered outside the package works in every process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.distributed.tensor import DTensor

ActorHandle = Any


class LearnerWeights(Protocol):
    """The policy's weights, as a learner rank lends them to a sender."""

    def stream(self) -> Iterator[tuple[str, torch.Tensor]] | None:
        """Rank 0: (HF name, tensor) pairs, LoRA merged, each checked finite as it passes;
        another rank takes part in the gathers (sharded learners) and gets None."""
        ...

    def layout(self) -> Mapping[str, torch.Tensor]:
        """Every tensor's name, shape and dtype (no data need be gathered)."""
        ...


class LearnerGroupHandle(Protocol):
    """The learner as the driver holds it: rank 0 and the ranks that gather with it."""

    lead: ActorHandle
    helpers: tuple[ActorHandle, ...]


class WeightSource(Protocol):
    """The weights of one policy version."""

    version: int

    def load_into(self, workers: Sequence[ActorHandle], timeout_s: float) -> list[int]:
        """Load this version into every worker; returns the versions they report."""
        ...


class WeightSync(Protocol):
    """One way of bringing the learner's weights to the rollout workers."""

    name: str

    def sender(self, weights: LearnerWeights) -> Any:
        """The learner-side state (its methods are the operations `weight_call` runs)."""
        ...

    def source(self, version: int, learner: LearnerGroupHandle, procs_per_worker: int) -> WeightSource:
        """The driver side of a push of `version` (`procs_per_worker`: each engine's
        tensor-parallel size)."""
        ...

    def receive(self, payload: tuple, rank: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """The receiver, in the process holding the model (`rank`: that process's rank in
        the push, for methods that form a group)."""
        ...


def check_finite(state_dict: Mapping[str, torch.Tensor], action: str = "publish") -> None:
    """Refuse to publish (or save) non-finite weights: name the first tensor that has a NaN or
    inf (tensors sharded across ranks are checked as they are gathered, in `finite`)."""
    for name, tensor in state_dict.items():
        if not isinstance(tensor, DTensor):
            _check(name, tensor, action)


def finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream, each tensor checked before it passes."""
    for name, tensor in tensors:
        _check(name, tensor)
        yield name, tensor


def _check(name: str, tensor: torch.Tensor, action: str = "publish") -> None:
    if tensor.device.type == "meta":  # a layout entry with a shape only (a split weight): checked as it streams
        return
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"refusing to {action} weights: {name} has non-finite values")


def on_rank_zero(weights: Iterator[tuple[str, torch.Tensor]], rank: int) -> Iterator[tuple[str, torch.Tensor]] | None:
    """Rank 0: `weights`; another rank drains them (under FSDP each is a gather all ranks join)
    and gets None."""
    if rank == 0:
        return weights
    for _ in weights:
        pass
    return None


def tied_aliases(state: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of a state dict that alias an earlier name's memory (tied weights, e.g. a Gemma or
    Qwen2-0.5B `lm_head.weight` that is the input embedding). A push leaves them out: the
    engine ties them itself, and some engines (vLLM's Gemma 2) refuse a tied head by name."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    aliases = set()
    for name, tensor in state.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.device.type == "meta" or local.numel() == 0:
            continue
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key in seen:
            aliases.add(name)
        seen.add(key)
    return aliases

"""Object-store weight sync (`rollout.weight_sync: object_store`), the CPU / small-model path.

Wire format: the state dict as safetensors bytes in size-bounded chunks. The learner's rank 0
serialises once, streaming (each chunk becomes its own object as soon as it is full, so only
one chunk's tensors are held at a time); every rollout worker fetches the chunks (once per
node) and loads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load, save

from rlfleet.common.registry import WEIGHT_SYNC
from rlfleet.weight_sync.base import ActorHandle, LearnerGroupHandle, LearnerWeights, finite

if TYPE_CHECKING:
    import ray

DEFAULT_CHUNK_BYTES = 256 * 2**20


def serialize_state_dict(
    state_dict: Mapping[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[bytes]:
    """Safetensors blobs of at most ~`chunk_bytes` each (a tensor larger than that gets its own)."""
    return list(iter_chunks(state_dict.items(), chunk_bytes))


def iter_chunks(tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """`serialize_state_dict` over a stream of (name, tensor): each chunk is yielded as soon as
    it is full."""
    current: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[int] = set()
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > chunk_bytes:
            yield save(current)
            current, size, seen = {}, 0, set()
        flat = tensor.detach().contiguous().cpu()
        if flat.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            flat = flat.clone()
        seen.add(flat.data_ptr())
        current[name] = flat
        size += nbytes
    if current:
        yield save(current)


def iter_state_dict(chunks: Sequence[bytes]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of every chunk (order within a chunk is safetensors' own)."""
    for blob in chunks:
        yield from load(blob).items()


def object_store_chunks(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Safetensors chunks of a state dict or a (name, tensor) stream, each tensor checked finite."""
    tensors = weights.items() if isinstance(weights, Mapping) else weights
    return iter_chunks(finite(tensors), chunk_bytes)


class ChunkSender:
    """Learner side: `chunks()` (a Ray streaming generator through `weight_stream`)."""

    def __init__(self, weights: LearnerWeights):
        self._weights = weights

    def chunks(self) -> Iterator[bytes]:
        stream = self._weights.stream()
        return iter_chunks(stream) if stream is not None else iter(())  # checked finite as it streams


@dataclass(frozen=True)
class ObjectStoreWeights:
    """Safetensors chunks already in the Ray object store (put there once by the learner)."""

    version: int
    chunks: tuple[ray.ObjectRef, ...]

    def load_into(self, workers: Sequence[ActorHandle], timeout_s: float) -> list[int]:
        import ray  # here: the learner and the workers import this module where Ray may be absent (gpu_check)

        calls = [w.receive_weights.remote(OBJECT_STORE, self.version, 0, *self.chunks) for w in workers]
        return ray.get(calls, timeout=timeout_s)


class ObjectStoreSync:
    name = "object_store"

    def sender(self, weights: LearnerWeights) -> ChunkSender:
        return ChunkSender(weights)

    def source(self, version: int, learner: LearnerGroupHandle, procs_per_worker: int) -> ObjectStoreWeights:
        # the other ranks of a sharded learner yield nothing; they gather with rank 0
        helping = [h.weight_stream.remote(self, "chunks") for h in learner.helpers]
        refs = tuple(learner.lead.weight_stream.remote(self, "chunks"))
        for generator in helping:
            for _ in generator:
                pass
        return ObjectStoreWeights(version, refs)

    def receive(self, payload: tuple, rank: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_state_dict(payload)


OBJECT_STORE = WEIGHT_SYNC.register("object_store")(ObjectStoreSync())

"""Broadcast weight sync (`rollout.weight_sync: broadcast`): NCCL on GPU, gloo on CPU.

Wire format: the state dict as a few flat byte buckets whose layout both sides derive from the
same `Bucket` plan (made from shapes alone), so only the bytes travel collectively. The
learner's rank 0 serves the rendezvous of a fresh group for every push (membership may change
between pushes), then broadcasts each bucket once to every rollout process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from rlfleet.common.collective import BroadcastGroup, serve_store
from rlfleet.common.registry import WEIGHT_SYNC
from rlfleet.weight_sync.base import (
    ActorHandle,
    LearnerGroupHandle,
    LearnerWeights,
    check_finite,
    finite,
)

DEFAULT_BUCKET_BYTES = 256 * 2**20
_ALIGN = 256  # every tensor starts at a multiple of this many bytes inside its bucket


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in its bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """torch dtype name, e.g. 'float32'."""
    offset: int
    """Byte offset inside the bucket."""
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    """One flat buffer of a broadcast push."""

    tensors: tuple[TensorMeta, ...]
    nbytes: int


@dataclass(frozen=True)
class WeightGroupInfo:
    """How a receiver joins one broadcast push: the rendezvous and the bucket layout."""

    host: str
    port: int
    world_size: int
    """Sender (rank 0) plus every receiving process."""
    backend: str
    """'gloo' (CPU) or 'nccl' (GPU)."""
    buckets: tuple[Bucket, ...]


def plan_buckets(state_dict: Mapping[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[Bucket, ...]:
    """Group tensors, in order, into buckets of at most ~`bucket_bytes` (a bigger tensor gets its own)."""
    buckets: list[Bucket] = []
    metas: list[TensorMeta] = []
    offset = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if metas and offset + nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(metas), offset))
            metas, offset = [], 0
        dtype = str(tensor.dtype).removeprefix("torch.")
        metas.append(TensorMeta(name, tuple(tensor.shape), dtype, offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    if metas:
        buckets.append(Bucket(tuple(metas), offset))
    return tuple(buckets)


def pack_bucket(state_dict: Mapping[str, torch.Tensor], bucket: Bucket, device: torch.device) -> torch.Tensor:
    """The bucket's flat uint8 buffer on `device`, filled from `state_dict`."""
    buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    for meta in bucket.tensors:
        raw = state_dict[meta.name].detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[meta.offset : meta.offset + meta.nbytes].copy_(raw)
    return buffer


def unpack_bucket(buffer: torch.Tensor, bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views into a received buffer, in the bucket's order."""
    for meta in bucket.tensors:
        raw = buffer[meta.offset : meta.offset + meta.nbytes]
        yield meta.name, raw.view(getattr(torch, meta.dtype)).reshape(meta.shape)


def receive_buckets(group: BroadcastGroup, info: WeightGroupInfo, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side of a push: (name, tensor) pairs, one bucket broadcast at a time."""
    for bucket in info.buckets:
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        group.broadcast(buffer, src=0)
        yield from unpack_bucket(buffer, bucket)


class WeightBroadcaster:
    """Sender side of a broadcast push: `open` (returns what receivers need), then `send`."""

    def __init__(self, weights: LearnerWeights | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timeout_s: float = 300.0):
        self._weights = weights
        self._bucket_bytes = bucket_bytes
        self._timeout_s = timeout_s
        self._pending: tuple | None = None

    def open(self, world_size: int, state_dict: Mapping[str, torch.Tensor] | None = None) -> WeightGroupInfo:
        """Serve the rendezvous for `world_size` ranks (this one is rank 0) and plan the buckets
        (from `state_dict`, or the learner's layout)."""
        layout = state_dict if state_dict is not None else self._weights.layout()
        check_finite(layout)
        first = next(iter(layout.values()))
        backend = "nccl" if first.is_cuda else "gloo"
        store, host, port = serve_store(world_size, timeout_s=self._timeout_s)
        info = WeightGroupInfo(host, port, world_size, backend, plan_buckets(layout, self._bucket_bytes))
        self._pending = (store, info, first.device)
        return info

    def send(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None) -> int:
        """Join the group as rank 0 and broadcast every bucket; returns the bytes sent (0 on a
        rank other than 0). `weights` (default: the learner's stream) is a state dict or a stream
        in the planned order, consumed one bucket at a time."""
        checked = weights is None  # the learner's stream is checked finite as it passes
        if weights is None:
            weights = self._weights.stream()
            if weights is None:
                return 0
        if self._pending is None:
            raise RuntimeError("WeightBroadcaster.send() before open()")
        store, info, device = self._pending
        self._pending = None
        group = BroadcastGroup(0, info.world_size, info.backend, info.host, info.port, store=store,
                               timeout_s=self._timeout_s)
        stream = weights.items() if isinstance(weights, Mapping) else weights
        stream = stream if checked else finite(stream)
        for bucket in info.buckets:
            part = dict(itertools.islice(stream, len(bucket.tensors)))
            group.broadcast(pack_bucket(part, bucket, device), src=0)
        return sum(b.nbytes for b in info.buckets)


@dataclass(frozen=True)
class BroadcastWeights:
    """A push from the learner's rank 0 (`sender`), whose `helpers` (the other ranks of a
    sharded learner) take part in gathering the weights. The learner's current weights are
    sent when the push runs."""

    version: int
    sender: ActorHandle
    procs_per_worker: int = 1
    helpers: tuple[ActorHandle, ...] = ()

    def load_into(self, workers: Sequence[ActorHandle], timeout_s: float) -> list[int]:
        import ray  # here: the learner and the workers import this module where Ray may be absent (gpu_check)

        world = 1 + len(workers) * self.procs_per_worker
        info = ray.get(self.sender.weight_call.remote(BROADCAST, "open", world), timeout=timeout_s)
        receives = [w.receive_weights.remote(BROADCAST, self.version, 1 + i * self.procs_per_worker, info)
                    for i, w in enumerate(workers)]
        send = [h.weight_call.remote(BROADCAST, "send") for h in (self.sender, *self.helpers)]
        ray.get(send, timeout=timeout_s)
        return ray.get(receives, timeout=timeout_s)


class BroadcastSync:
    name = "broadcast"

    def sender(self, weights: LearnerWeights) -> WeightBroadcaster:
        return WeightBroadcaster(weights)

    def source(self, version: int, learner: LearnerGroupHandle, procs_per_worker: int) -> BroadcastWeights:
        return BroadcastWeights(version, learner.lead, procs_per_worker, tuple(learner.helpers))

    def receive(self, payload: tuple, rank: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        (info,) = payload
        group = BroadcastGroup(rank, info.world_size, info.backend, info.host, info.port)
        return receive_buckets(group, info, device)


BROADCAST = WEIGHT_SYNC.register("broadcast")(BroadcastSync())

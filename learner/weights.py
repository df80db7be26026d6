"""Publishing the learner's weights to the rollout fleet.

- `object_store_chunks`: safetensors chunks (the caller puts them in the Ray object store once;
  every worker fetches them). The CPU / small-model path.
- `WeightBroadcaster`: rank 0 of a one-push process group (NCCL on GPU, gloo on CPU); the
  buckets are broadcast once to every rollout process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch.distributed.tensor import DTensor

from rlfleet.common.collective import BroadcastGroup, serve_store
from rlfleet.common.weights import (
    DEFAULT_CHUNK_BYTES,
    WeightGroupInfo,
    iter_chunks,
    pack_bucket,
    plan_buckets,
)


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
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"refusing to {action} weights: {name} has non-finite values")


def object_store_chunks(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Safetensors chunks of a state dict or a (name, tensor) stream, each tensor checked finite."""
    tensors = weights.items() if isinstance(weights, Mapping) else weights
    return iter_chunks(finite(tensors), chunk_bytes)


class WeightBroadcaster:
    """Sender side of a broadcast push: `open` (returns what receivers need), then `send`."""

    def __init__(self, bucket_bytes: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 300.0):
        self._bucket_bytes = bucket_bytes
        self._timeout_s = timeout_s
        self._pending: tuple | None = None

    def open(self, state_dict: Mapping[str, torch.Tensor], world_size: int) -> WeightGroupInfo:
        """Serve the rendezvous for `world_size` ranks (this one is rank 0) and plan the buckets."""
        check_finite(state_dict)
        first = next(iter(state_dict.values()))
        backend = "nccl" if first.is_cuda else "gloo"
        store, host, port = serve_store(world_size, timeout_s=self._timeout_s)
        info = WeightGroupInfo(host, port, world_size, backend, plan_buckets(state_dict, self._bucket_bytes))
        self._pending = (store, info, first.device)
        return info

    def send(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Join the group as rank 0 and broadcast every bucket; returns the bytes sent.
        `weights` is a state dict or a stream in the planned order (consumed one bucket at a time)."""
        if self._pending is None:
            raise RuntimeError("WeightBroadcaster.send() before open()")
        store, info, device = self._pending
        self._pending = None
        group = BroadcastGroup(0, info.world_size, info.backend, info.host, info.port, store=store,
                               timeout_s=self._timeout_s)
        stream = finite(weights.items() if isinstance(weights, Mapping) else weights)
        for bucket in info.buckets:
            part = dict(itertools.islice(stream, len(bucket.tensors)))
            group.broadcast(pack_bucket(part, bucket, device), src=0)
        return sum(b.nbytes for b in info.buckets)


def on_rank_zero(weights: Iterator[tuple[str, torch.Tensor]], rank: int) -> Iterator[tuple[str, torch.Tensor]] | None:
    """Rank 0: `weights`; another rank drains them (under FSDP each is a gather all ranks join)
    and gets None."""
    if rank == 0:
        return weights
    for _ in weights:
        pass
    return None

"""Where a rollout pool gets the weights of a version from: the object store, or a broadcast.

A source brings any list of workers to its version; the pool uses it for a push to all
workers and to re-sync a worker that was added or restarted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray

ActorHandle = Any


class WeightSource(Protocol):
    """The weights of one policy version."""

    version: int

    def load_into(self, workers: Sequence[ActorHandle], timeout_s: float) -> list[int]:
        """Load this version into every worker; returns the versions they report."""
        ...


@dataclass(frozen=True)
class ObjectStoreWeights:
    """Safetensors chunks already in the Ray object store (put there once by the learner)."""

    version: int
    chunks: tuple[ray.ObjectRef, ...]

    def load_into(self, workers: Sequence[ActorHandle], timeout_s: float) -> list[int]:
        calls = [w.load_weights.remote(self.version, *self.chunks) for w in workers]
        return ray.get(calls, timeout=timeout_s)


@dataclass(frozen=True)
class BroadcastWeights:
    """A sender actor (the learner, rank 0) that broadcasts its current weights in buckets.

    `sender` has `open_weight_group(world_size) -> WeightGroupInfo` and
    `broadcast_weights() -> int`; `procs_per_worker` is each engine's tensor-parallel size.
    A fresh group is formed for every call, so membership may change between pushes.
    """

    version: int
    sender: ActorHandle
    procs_per_worker: int = 1
    helpers: tuple[ActorHandle, ...] = ()
    """Actors that must call `broadcast_weights` with the sender (the other ranks of a sharded
    learner group, which take part in gathering the weights)."""

    def load_into(self, workers: Sequence[ActorHandle], timeout_s: float) -> list[int]:
        world = 1 + len(workers) * self.procs_per_worker
        info = ray.get(self.sender.open_weight_group.remote(world), timeout=timeout_s)
        receives = [
            w.receive_weights.remote(self.version, info, 1 + i * self.procs_per_worker)
            for i, w in enumerate(workers)
        ]
        send = [self.sender.broadcast_weights.remote()] + [h.broadcast_weights.remote() for h in self.helpers]
        ray.get(send, timeout=timeout_s)
        return ray.get(receives, timeout=timeout_s)

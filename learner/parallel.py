"""Data parallelism for a group of D learners: torch.distributed with DDP.

Every rank holds the whole step's batch and computes the same advantages (GRPO's group
statistics and GAE's whitening are batch-wide) and the same minibatch order; of each
minibatch it trains only its share, balanced by token count (`balanced_shards`). The loss is
normalised by the minibatch's global token count, so the gradients DDP sums over the ranks
are the whole minibatch's: the update does not depend on D. DDP averages gradients, hence the
loss is scaled by D. A rank whose share is empty runs one sequence at weight 0, because every
rank must take part in every gradient all-reduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rlfleet.common.collate import balanced_shards
from rlfleet.common.collective import serve_store


class DataParallel:
    """This rank's place in the group (rank 0 of 1 when there is no group)."""

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self._store = None
        self._device = torch.device("cpu")
        self._wrapped: dict[int, DistributedDataParallel] = {}

    def open(self, world_size: int) -> tuple[str, int]:
        """Rank 0: serve the rendezvous on a free port; returns (host, port) for the others."""
        self._store, host, port = serve_store(world_size)
        return host, port

    def join(self, rank: int, world_size: int, host: str, port: int, device: torch.device,
             models: Sequence[torch.nn.Module], timeout_s: float = 300.0) -> None:
        """Form the default process group (gloo on CPU, NCCL on GPU) and wrap `models` in DDP."""
        timeout = timedelta(seconds=timeout_s)
        store = self._store if rank == 0 else dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        self.rank, self.world_size, self._device = rank, world_size, device
        for model in models:
            ids = [device.index] if device.type == "cuda" else None
            self._wrapped[id(model)] = DistributedDataParallel(model, device_ids=ids)

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What to call for a forward pass that trains `model` (its DDP wrapper in a group)."""
        return self._wrapped.get(id(model), model)

    def no_sync(self, skip: bool, models: Sequence[torch.nn.Module]):
        """Accumulate without the all-reduce (every micro-batch of a minibatch but the last)."""
        stack = contextlib.ExitStack()
        if skip:
            for model in models:
                if id(model) in self._wrapped:
                    stack.enter_context(self._wrapped[id(model)].no_sync())
        return stack

    def share(self, idx: Sequence[int], lengths: Sequence[int]) -> list[int]:
        """This rank's part of a minibatch `idx` (indices into the batch), balanced by length."""
        if self.world_size == 1:
            return list(idx)
        shards = balanced_shards([lengths[i] for i in idx], self.world_size)
        return [idx[j] for j in shards[self.rank]]

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` holds on every rank (all ranks then skip or step together)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def gather(self, obj):
        """Every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

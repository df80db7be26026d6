"""Data parallelism for a group of D learners: torch.distributed with DDP or FSDP2.

Every rank holds the whole step's batch and computes the same advantages (GRPO's group
statistics and GAE's whitening are batch-wide) and the same minibatch order; of each
minibatch it trains only its share, balanced by token count (`balanced_shards`). The loss is
normalised by the minibatch's global token count, so the gradients DDP sums over the ranks
are the whole minibatch's: the update does not depend on D. DDP averages gradients, hence the
loss is scaled by D. A rank whose share is empty runs one sequence at weight 0, because every
rank must take part in every gradient all-reduce.

Strategies (`learner.strategy`):
- `ddp`: every rank holds the whole model; gradients are all-reduced once per minibatch (the
  last micro-batch), the others accumulate under `no_sync`.
- `fsdp`: FSDP2 (`fully_shard`) on each decoder layer and on the root, so a rank holds 1/D of
  the parameters, gradients and optimizer state. Every forward all-gathers a layer's weights
  and every backward reduce-scatters its gradients (averaged over the ranks, like DDP), so all
  ranks must run the same number of forward passes: `rounds` says how many, and a rank with
  fewer real micro-batches runs weight-0 ones. Full weights are gathered tensor by tensor
  (`models.iter_full_weights`) when they are published or saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
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
        self.sharded = False

    def open(self, world_size: int) -> tuple[str, int]:
        """Rank 0: serve the rendezvous on a free port; returns (host, port) for the others."""
        self._store, host, port = serve_store(world_size)
        return host, port

    def join(self, rank: int, world_size: int, host: str, port: int, device: torch.device,
             models: Sequence[torch.nn.Module], strategy: str = "ddp", frozen: Sequence[torch.nn.Module] = (),
             timeout_s: float = 300.0) -> None:
        """Form the default process group (gloo on CPU, NCCL on GPU); wrap the trained `models`
        in DDP, or shard them and the `frozen` ones (a colocated reference) with FSDP2."""
        timeout = timedelta(seconds=timeout_s)
        store = self._store if rank == 0 else dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        self.rank, self.world_size, self._device = rank, world_size, device
        if strategy == "fsdp":
            mesh = init_device_mesh(device.type, (world_size,))
            for model in [*models, *frozen]:
                shard_model(model, mesh)
            self.sharded = True
            return
        for model in models:
            ids = [device.index] if device.type == "cuda" else None
            # Buffers (rotary frequencies) never change: broadcasting them would make every
            # forward pass a collective, and ranks run different numbers of micro-batches.
            self._wrapped[id(model)] = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

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

    def rounds(self, count: int) -> int:
        """How many forward passes every rank must run when this one needs `count`: the most
        any rank needs when the model is sharded (each pass is a collective), else `count`."""
        if not self.sharded:
            return count
        t = torch.tensor([float(count)], device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` holds on every rank (all ranks then skip or step together)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `t` over the ranks (in place)."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj):
        """Every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def shard_model(model: torch.nn.Module, mesh) -> None:
    """FSDP2: one unit per transformer block (the classes transformers' `_no_split_modules`
    names, as veRL wraps), then the root (embeddings, final norm, heads)."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)

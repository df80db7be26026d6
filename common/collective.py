"""A stateless process group for weight broadcasts, on torch.distributed alone.

It never touches the default process group (vLLM's workers and a data-parallel learner each
have their own), so a sender and any set of receivers can form one for a push and close it
after: membership may change between pushes (workers added, removed or restarted).
Rendezvous is a TCPStore served by the sender on a port the OS picks (no fixed port).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def local_host() -> str:
    """An address of this node that other nodes can reach (best effort; 127.0.0.1 alone)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def serve_store(world_size: int, host: str | None = None, timeout_s: float = 300.0) -> tuple[dist.TCPStore, str, int]:
    """Start the rendezvous store on a free port; returns (store, host, port)."""
    host = host or local_host()
    store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return store, host, store.port


class BroadcastGroup:
    """A process group of `world_size` ranks used only to broadcast tensors from rank 0."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        backend: str,
        host: str,
        port: int,
        store: dist.TCPStore | None = None,
        timeout_s: float = 300.0,
    ):
        timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        self._store = store
        if backend == "gloo":
            self._pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        elif backend == "nccl":
            self._pg = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            raise ValueError(f"unknown broadcast backend {backend!r}; valid: gloo, nccl")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In-place broadcast of `tensor` from rank `src` to every rank."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self._pg.broadcast([tensor], opts).wait()

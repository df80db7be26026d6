"""The wire formats of a weight push. Names are always the HF checkpoint names.

- Object store (CPU, small models): the state dict as safetensors bytes in size-bounded
  chunks; the learner serialises once, every rollout worker fetches and loads the chunks.
- Broadcast (GPU: NCCL; CPU: gloo): the state dict as a few flat byte buckets whose layout both
  sides derive from the same `Bucket` plan; the sender broadcasts each bucket once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

DEFAULT_CHUNK_BYTES = 256 * 2**20


def serialize_state_dict(
    state_dict: Mapping[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[bytes]:
    """Safetensors blobs of at most ~`chunk_bytes` each (a tensor larger than that gets its own)."""
    return list(iter_chunks(state_dict.items(), chunk_bytes))


def iter_chunks(tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """`serialize_state_dict` over a stream of (name, tensor): each chunk is yielded as soon as
    it is full, so only one chunk's tensors are held at a time."""
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


# ---------------------------------------------------------------- collective (broadcast) pushes
# A broadcast push sends the state dict as a few flat byte buffers ("buckets"); both sides
# compute the same layout from the tensor metadata, so only the bytes travel collectively.
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


def plan_buckets(state_dict: Mapping[str, torch.Tensor], bucket_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[Bucket, ...]:
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

"""The wire format of a weight push: a state dict as safetensors bytes, in size-bounded chunks.

The learner serialises once and puts each chunk in the Ray object store; every rollout worker
fetches the chunks and loads them into its engine. Names are the HF checkpoint names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from safetensors.torch import load, save

DEFAULT_CHUNK_BYTES = 256 * 2**20


def serialize_state_dict(
    state_dict: Mapping[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[bytes]:
    """Safetensors blobs of at most ~`chunk_bytes` each (a tensor larger than that gets its own)."""
    chunks: list[bytes] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > chunk_bytes:
            chunks.append(save(current))
            current, size = {}, 0
        flat = tensor.detach().contiguous().cpu()
        if flat.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            flat = flat.clone()
        seen.add(flat.data_ptr())
        current[name] = flat
        size += nbytes
    if current:
        chunks.append(save(current))
    return chunks


def iter_state_dict(chunks: Sequence[bytes]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of every chunk, in order."""
    for blob in chunks:
        yield from load(blob).items()

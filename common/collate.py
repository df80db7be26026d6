"""Collating (prompt, response) token ids into padded tensors for a forward pass.

Notation: B sequences, P the widest prompt, T the longest response. Prompts are left-padded
and responses right-padded, so every response starts at column P and the logits that predict
response token t are at column P − 1 + t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    """B sequences laid out as [left-padded prompt | right-padded response]."""

    input_ids: torch.Tensor
    """Token ids [B, P + T] (pad id at padding)."""
    attention_mask: torch.Tensor
    """1 at real tokens [B, P + T]."""
    position_ids: torch.Tensor
    """Positions counted from each sequence's first real token [B, P + T]."""
    response_mask: torch.Tensor
    """1 where a response token was sampled [B, T] (float32)."""
    prompt_width: int
    """P: the column where every response starts."""

    @property
    def response_ids(self) -> torch.Tensor:
        """Response token ids [B, T]."""
        return self.input_ids[:, self.prompt_width :]

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.prompt_width,
        )


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    """Lay out B (prompt, response) pairs; a response may be empty (its mask row is all 0)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack needs as many prompts as responses, at least one (got {len(prompts)}, {len(responses)})")
    width_p = max(len(p) for p in prompts)
    width_r = max(max(len(r) for r in responses), 1)
    ids = torch.full((len(prompts), width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[row, width_p - len(p) : width_p] = torch.tensor(list(p), dtype=torch.long)
        ids[row, width_p : width_p + len(r)] = torch.tensor(list(r), dtype=torch.long)
        attention[row, width_p - len(p) : width_p + len(r)] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    response_mask = attention[:, width_p:].to(torch.float32)
    return PackedBatch(ids, attention, positions, response_mask, width_p)


def pad_rows(rows: Sequence[Sequence[float]], width: int, value: float = 0.0) -> torch.Tensor:
    """Right-pad float rows (per-token values of each response) to [B, width] (float32)."""
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} values; the batch is {width} wide")
        out[i, : len(row)] = torch.tensor(list(row), dtype=torch.float32)
    return out


def balanced_shards(lengths: Sequence[int], k: int) -> list[list[int]]:
    """Split indices 0..n−1 into k shards of near-equal total length (longest first, each to the
    lightest shard; ties to the lower shard), every shard in increasing index order.

    Deterministic, so every data-parallel rank computes the same assignment."""
    shards: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = min(range(k), key=lambda s: (loads[s], s))
        shards[target].append(i)
        loads[target] += lengths[i]
    return [sorted(s) for s in shards]

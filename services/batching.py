"""Padding and micro-batching shared by the services' forward passes.

Notation: B sequences, L padded length. Sequences are sorted by length before they are cut
into micro-batches, so each micro-batch pads only to its own longest member; results are
returned in the caller's order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def micro_batches(lengths: Sequence[int], size: int) -> Iterator[list[int]]:
    """Indices of the sequences, by increasing length, in groups of at most `size`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), size):
        yield order[start : start + size]


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], attention_mask [B, L], position_ids [B, L]) for `seqs`.

    Position ids count real tokens only, so a left-padded row sees the same positions as the
    unpadded sequence (transformers would otherwise number the padding too).
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def last_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B]: the index of each row's last real (mask 1) token."""
    width = mask.shape[-1]
    return width - 1 - mask.flip(-1).argmax(-1)

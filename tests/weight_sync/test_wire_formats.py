"""Weight wire formats: safetensors chunks and broadcast buckets round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from rlfleet.weight_sync.broadcast import (
    WeightBroadcaster,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)
from rlfleet.weight_sync.object_store import (
    iter_state_dict,
    object_store_chunks,
    serialize_state_dict,
)

pytestmark = pytest.mark.unit


def mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 13, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.steps": torch.arange(5, dtype=torch.int64),
        "d.weight": torch.randn(64, 64, generator=g, dtype=torch.float64),
        "e.scale": torch.randn(1, generator=g).to(torch.float16),
    }


@pytest.mark.parametrize("limit", [1, 300, 10_000, 10**9])
def test_chunks_round_trip_bit_exactly(limit):
    sd = mixed_state_dict()
    chunks = serialize_state_dict(sd, chunk_bytes=limit)
    if limit == 1:
        assert len(chunks) == len(sd)  # one tensor per chunk
    if limit == 10**9:
        assert len(chunks) == 1
    back = dict(iter_state_dict(chunks))
    assert set(back) == set(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_tied_weights_serialise():
    shared = torch.randn(4, 4)
    back = dict(iter_state_dict(serialize_state_dict({"embed": shared, "lm_head": shared})))
    assert torch.equal(back["embed"], shared) and torch.equal(back["lm_head"], shared)


@pytest.mark.parametrize("limit", [1, 500, 40_000, 10**9])
def test_buckets_round_trip_bit_exactly(limit):
    sd = mixed_state_dict()
    buckets = plan_buckets(sd, bucket_bytes=limit)
    assert [m.name for b in buckets for m in b.tensors] == list(sd)
    for bucket in buckets:
        assert all(m.offset % 256 == 0 for m in bucket.tensors)  # aligned views for every dtype
        assert bucket.nbytes <= max(limit, max(m.nbytes for m in bucket.tensors)) + 255
    back = {}
    for bucket in buckets:
        buffer = pack_bucket(sd, bucket, torch.device("cpu"))
        back.update(unpack_bucket(buffer.clone(), bucket))
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t)


def test_non_finite_weights_are_never_published():

    sd = mixed_state_dict()
    sd["d.weight"][3, 4] = float("nan")
    with pytest.raises(ValueError, match="refusing to publish weights: d.weight has non-finite values"):
        list(object_store_chunks(sd))
    with pytest.raises(ValueError, match="d.weight has non-finite values"):
        WeightBroadcaster().open(2, sd)

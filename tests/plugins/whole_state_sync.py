"""A new weight-sync method, whole: the learner's rank 0 saves the whole state dict with
`torch.save` into one object-store object; each worker loads it. `plugins:
[tests.plugins.whole_state_sync]` and `rollout.weight_sync: whole_state` select it."""

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from rlfleet.common.registry import WEIGHT_SYNC


class _Sender:
    def __init__(self, weights):
        self._weights = weights

    def blob(self) -> bytes | None:
        stream = self._weights.stream()  # None on ranks other than 0 (they gather with it)
        if stream is None:
            return None
        buffer = io.BytesIO()
        torch.save({name: t.detach().cpu().clone() for name, t in stream}, buffer)
        return buffer.getvalue()


@dataclass(frozen=True)
class _Source:
    version: int
    blob: ray.ObjectRef

    def load_into(self, workers: Sequence[Any], timeout_s: float) -> list[int]:
        return ray.get([w.receive_weights.remote(WHOLE_STATE, self.version, 0, self.blob) for w in workers],
                       timeout=timeout_s)


class WholeStateSync:
    name = "whole_state"

    def sender(self, weights) -> _Sender:
        return _Sender(weights)

    def source(self, version: int, learner, procs_per_worker: int) -> _Source:
        blobs = [h.weight_call.remote(self, "blob") for h in (learner.lead, *learner.helpers)]
        ray.wait(blobs, num_returns=len(blobs), timeout=300)
        return _Source(version, blobs[0])

    def receive(self, payload: tuple, rank: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        (blob,) = payload
        return iter(torch.load(io.BytesIO(blob), map_location=device, weights_only=True).items())


WHOLE_STATE = WEIGHT_SYNC.register("whole_state")(WholeStateSync())

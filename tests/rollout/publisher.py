"""A stand-in for the learner's publishing side in rollout tests: a real model behind the
learner's weight-sync endpoints (`weight_call`, `weight_stream`), with real senders."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from rlfleet.weight_sync.base import WeightSync, finite
from rlfleet.weight_sync.broadcast import WeightBroadcaster


class _Weights:
    def __init__(self, model: torch.nn.Module):
        self._model = model

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        return finite(iter(self._model.state_dict().items()))

    def layout(self) -> dict[str, torch.Tensor]:
        return self._model.state_dict()


class Publisher:
    """`bucket_bytes`: the broadcast's bucket size (small: a push of several buckets)."""

    def __init__(self, model_dir: str, device: str = "cpu", bucket_bytes: int = 300_000):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        self._bucket_bytes = bucket_bytes
        self._senders: dict[str, Any] = {}

    def weight_call(self, sync: WeightSync, op: str, *args: Any) -> Any:
        return getattr(self._sender(sync), op)(*args)

    def weight_stream(self, sync: WeightSync, op: str, *args: Any) -> Iterator[Any]:
        for item in getattr(self._sender(sync), op)(*args):  # noqa: UP028 - Ray drives it with send()
            yield item

    def _sender(self, sync: WeightSync) -> Any:
        if sync.name not in self._senders:
            weights = _Weights(self.model)
            self._senders[sync.name] = WeightBroadcaster(weights, self._bucket_bytes) if sync.name == "broadcast" \
                else sync.sender(weights)
        return self._senders[sync.name]


class Learner:
    """What a weight-sync source needs of the learner group: rank 0 and no helpers."""

    def __init__(self, lead: Any):
        self.lead = lead
        self.helpers: tuple = ()

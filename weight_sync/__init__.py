"""Weight sync: how the learner's weights reach the rollout workers, one module per method
(`rollout.weight_sync`), each with its sender, source, receiver and wire format
(`rlfleet.weight_sync.base` says what a method implements). Importing the package registers
the built-in methods in `rlfleet.common.registry.WEIGHT_SYNC`."""

from __future__ import annotations

from rlfleet.common.registry import WEIGHT_SYNC
from rlfleet.weight_sync.base import LearnerWeights, WeightSource, WeightSync
from rlfleet.weight_sync.broadcast import BROADCAST
from rlfleet.weight_sync.object_store import OBJECT_STORE

__all__ = ["BROADCAST", "OBJECT_STORE", "WEIGHT_SYNC", "LearnerWeights", "WeightSource", "WeightSync"]

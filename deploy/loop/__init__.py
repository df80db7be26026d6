"""The training loop: the stages of a step (`stages.py`), the synchronous and the overlapped
loop that run them (`synchronous.py`, `overlapped.py`), and what watches a run between steps
(health, the over-optimisation guard, evaluation, checkpoints, fleet scaling)."""

from __future__ import annotations

from rlfleet.common.config import RunConfig
from rlfleet.common.data import PromptDataset, PromptSampler
from rlfleet.deploy.actors.parts import Parts
from rlfleet.deploy.loop.health import UnscorableLog
from rlfleet.deploy.loop.overlapped import Overlapped
from rlfleet.deploy.loop.synchronous import Synchronous

Loop = Synchronous | Overlapped


def build_loop(cfg: RunConfig, parts: Parts, data: PromptDataset, sampler: PromptSampler,
               unscorable: UnscorableLog) -> Loop:
    """The loop `cfg` asks for (build it after resume: the overlapped one takes the fleet into
    its thread)."""
    if cfg.rollout.max_staleness == 0:
        return Synchronous(cfg, parts, data, sampler, unscorable)
    return Overlapped(cfg, parts, data, sampler, unscorable, parts.learner.version())

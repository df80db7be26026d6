"""The synchronous loop (`rollout.max_staleness: 0`): every step generates with the weights the
learner just pushed, and every worker reports the new version before the next step starts."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

from rlfleet.common.config import RunConfig
from rlfleet.common.data import PromptDataset, PromptSampler
from rlfleet.deploy.actors.parts import Parts
from rlfleet.deploy.loop import episodes, stages
from rlfleet.deploy.loop.health import UnscorableLog


class Synchronous:
    """Steps of the synchronous loop."""

    def __init__(self, cfg: RunConfig, parts: Parts, data: PromptDataset, sampler: PromptSampler,
                 unscorable: UnscorableLog):
        self._cfg, self._parts, self._data, self._sampler = cfg, parts, data, sampler
        self._unscorable = unscorable

    def step(self, step: int) -> dict[str, Any]:
        cfg, parts = self._cfg, self._parts
        timer, began = stages.PhaseTimer(), time.perf_counter()
        examples = stages.draw(cfg, self._data, self._sampler)
        with timer("generate"):
            batch = episodes.generate(cfg, parts.pool, examples, stages.sampling_spec(cfg, step))
        sb, metrics = stages.score(cfg, parts, stages.Generated(examples, batch), timer, self._extra_batches(step))
        batch_metrics, exp = stages.experience(cfg, parts, sb, timer, self._unscorable)
        metrics.update(batch_metrics)
        if exp is None:
            return stages.step_metrics(metrics, None, timer, began)
        if cfg.rollout.sleep_between_steps:  # colocated: the engines free their memory for the learner
            with timer("sleep"):
                freed = parts.pool.sleep()
            metrics["rollout/sleep_freed_mb"] = None if freed is None else freed / 2**20
        with timer("train"):
            result = stages.trained(stages.submit_train(cfg, parts, exp))
        with timer("push"):
            if cfg.rollout.sleep_between_steps:
                parts.pool.wake_up()
            versions = stages.push_weights(cfg, parts, result.version)
        if cfg.learner.offload:  # colocated: the learner's memory goes to the engines until the next step
            with timer("offload"):
                metrics["learner/offloaded_mb"] = parts.learner.offload() / 2**20
        metrics.update({"rollout/min_version": float(min(versions)), "rollout/max_version": float(max(versions)),
                        "rollout/num_workers": float(parts.pool.num_workers)})
        return stages.step_metrics(metrics, result, timer, began)

    def _extra_batches(self, step: int) -> Iterator[stages.Generated]:
        """Dynamic sampling's further batches of this step: drawn and generated as each is taken."""
        for i in itertools.count(1):
            examples = stages.draw(self._cfg, self._data, self._sampler)
            yield stages.Generated(examples, episodes.generate(self._cfg, self._parts.pool, examples,
                                                        stages.extra_spec(self._cfg, step, i)))

    def position(self) -> dict:
        """The sampler state to checkpoint."""
        return self._sampler.state_dict()

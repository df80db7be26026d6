"""`rollout.autoscale`: the fleet's size follows a signal measured every step.

The signal: the share of the step the learner waited for rollouts (`timing/generate` over
`timing/step`) and the fleet's idle share (1 − the engines' own time, `timing/generate_busy`,
over the step). Every `every_steps` steps, over their mean: the fleet grows by one worker when
the learner waited more than `grow_above` and shrinks by one when the engines idled more than
`shrink_above` (and the learner did not wait), inside [min_workers, max_workers]. A worker that
the cluster has no room for is asked of Ray's autoscaler (`ray.autoscaler.sdk.request_resources`,
a no-op without one) and the request stays pending: the fleet grows at the first step boundary
where a node offers the resources (a node that joins). Each decision is logged with its reason
and written into the step's metrics (`rollout/autoscale_*`).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from rlfleet.common.config import RunConfig
from rlfleet.deploy.actors.assembly import missing_resources
from rlfleet.deploy.actors.parts import Parts

logger = logging.getLogger(__name__)


class Autoscaler:
    """The decisions of `rollout.autoscale`, one call per step boundary."""

    def __init__(self, cfg: RunConfig):
        self._cfg, self._auto = cfg, cfg.rollout.autoscale
        self._seen: deque[tuple[float, float]] = deque(maxlen=self._auto.every_steps)  # since the last decision
        self._pending: int | None = None  # a size asked of the cluster that it had no room for

    def see(self, row: dict[str, Any]) -> None:
        """A finished step's metrics."""
        step_s = row.get("timing/step") or 0.0
        if step_s > 0:
            waited = min(1.0, (row.get("timing/generate") or 0.0) / step_s)
            idle = max(0.0, 1.0 - (row.get("timing/generate_busy") or 0.0) / step_s)
            self._seen.append((waited, idle))

    def decide(self, parts: Parts, done: int) -> dict[str, float]:
        """Between steps: grow, shrink or wait, as the signal and the cluster say; the metrics."""
        if not self._auto.enabled:
            return {}
        have = parts.pool.num_workers
        want, reason = self._target(have)
        if self._pending is not None and self._pending <= have:  # reached (by hand, `rlfleet scale`, too)
            self._pending = None
        if self._pending is not None and want == have:  # a shrink decision drops the request
            want, reason = self._pending, "a size asked of the cluster earlier"
        out = {"rollout/autoscale_target": float(want), "rollout/autoscale_pending": 0.0,
               "rollout/autoscale_refused": 0.0}
        if want != have:
            self._seen.clear()
        if want < have:
            parts.pool.scale_to(want)
            self._pending = None
            logger.info("autoscale after step %d: rollout workers %d -> %d (%s)", done, have, want, reason)
        elif want > have:
            missing = missing_resources(self._cfg.cluster.rollout, want - have)
            if not missing:
                parts.pool.scale_to(want)
                self._pending = None
                logger.info("autoscale after step %d: rollout workers %d -> %d (%s)", done, have, want, reason)
            else:
                out["rollout/autoscale_pending" if self._ask_cluster(want) else "rollout/autoscale_refused"] = 1.0
                if self._pending != want:
                    logger.warning("autoscale after step %d: %d rollout workers wanted (%s), but the cluster lacks %s; "
                                   "asked Ray's autoscaler for them, the fleet grows when a node offers them",
                                   done, want, reason, missing)
                self._pending = want
        return out

    def _target(self, have: int) -> tuple[int, str]:
        auto = self._auto
        if len(self._seen) < auto.every_steps:
            return have, ""
        waited = sum(w for w, _ in self._seen) / len(self._seen)
        idle = sum(i for _, i in self._seen) / len(self._seen)
        if waited > auto.grow_above and have < auto.max_workers:
            return have + 1, f"the learner waited {waited:.0%} of the last {len(self._seen)} steps for rollouts"
        if idle > auto.shrink_above and waited <= auto.grow_above and have > auto.min_workers:
            return have - 1, f"the engines idled {idle:.0%} of the last {len(self._seen)} steps"
        return have, ""

    def _ask_cluster(self, want: int) -> bool:
        """Ask Ray's autoscaler for `want` workers' resources; whether the request was made."""
        res = self._cfg.cluster.rollout
        bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {}), **res.resources}
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{k: v for k, v in bundle.items() if v}] * want)
            return True
        except Exception as err:  # noqa: BLE001 - a cluster without the autoscaler's API: refused, said so
            logger.warning("autoscale: could not ask Ray's autoscaler for resources (%s)", err)
            return False

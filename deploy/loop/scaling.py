"""Scaling the rollout fleet between steps, as the run's control actor asks (`rlfleet scale`,
`Trainer.scale_rollout`)."""

from __future__ import annotations

import logging
from typing import Any

import ray

from rlfleet.common.config import RunConfig
from rlfleet.common.records import ScaleDecision
from rlfleet.deploy.actors.assembly import missing_resources
from rlfleet.deploy.actors.parts import Parts

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 120.0


def apply_control(cfg: RunConfig, parts: Parts, control: Any, done: int) -> dict[str, float]:
    """Between steps: report progress to the run's control actor and apply a pending request
    (rollout workers: new ones get the current weights before they generate); the decision goes
    back to the control actor (for the caller) and into the step's metrics."""
    try:
        want, ticket = ray.get(control.take.remote(done, parts.pool.num_workers), timeout=CONTROL_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as err:
        raise RuntimeError(f"the run's control actor did not answer within {CONTROL_TIMEOUT_S:g} s "
                           f"(after step {done})") from err
    if want is None:
        return {}
    have = parts.pool.num_workers
    missing = missing_resources(cfg.cluster.rollout, want - have)
    if want == have:
        outcome, reason = "unchanged", ""
    elif missing:
        outcome, reason = "refused", f"the cluster lacks {missing}"
        logger.warning("not scaling the rollout fleet to %d workers: %s", want, reason)
    else:
        parts.pool.scale_to(want)
        outcome, reason = "granted", ""
        logger.info("after step %d: rollout workers %d -> %d", done, have, want)
    control.decide.remote(ScaleDecision(ticket, want, outcome, reason, done, parts.pool.num_workers))
    return {"rollout/scale_requested": float(want), "rollout/scale_refused": float(outcome == "refused")}

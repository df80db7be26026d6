"""Scaling the rollout fleet between steps, as the run's control actor asks (`rlfleet scale`,
`Trainer.scale_rollout`)."""

from __future__ import annotations

import logging
from typing import Any

import ray

from rlfleet.common.config import RoleResources, RunConfig
from rlfleet.deploy.actors.parts import Parts

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 120.0


def apply_control(cfg: RunConfig, parts: Parts, control: Any, done: int) -> None:
    """Between steps: report progress to the run's control actor and apply a pending request
    (rollout workers: new ones get the current weights before they generate)."""
    try:
        want = ray.get(control.take.remote(done, parts.pool.num_workers), timeout=CONTROL_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as err:
        raise RuntimeError(f"the run's control actor did not answer within {CONTROL_TIMEOUT_S:g} s "
                           f"(after step {done})") from err
    have = parts.pool.num_workers
    if want is None or want == have:
        return
    missing = missing_resources(cfg.cluster.rollout, want - have)
    if missing:
        logger.warning("not scaling the rollout fleet to %d workers: the cluster lacks %s", want, missing)
        return
    parts.pool.scale_to(want)
    logger.info("after step %d: rollout workers %d -> %d", done, have, want)


def missing_resources(res: RoleResources, extra: int) -> str:
    """'' when `extra` more actors of `res` fit in the cluster's free resources, else what lacks."""
    if extra <= 0:
        return ""
    free = ray.available_resources()
    need = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
    short = [f"{name} {amount * extra:g} (free {free.get(name, 0.0):g})"
             for name, amount in need.items() if amount and free.get(name, 0.0) < amount * extra - 1e-9]
    return ", ".join(short)

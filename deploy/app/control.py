"""The control surface of a running job: a named Ray actor the driver consults between steps.

Every run starts one `RunControl` actor named `rlfleet-control:<key>` in the `rlfleet` Ray
namespace. The key is the Ray job's submission id when the run was submitted as a job (what
`ray job submit` and `rlfleet submit` print), else the run folder's absolute path. Anything
that can reach the cluster (`rlfleet scale`, a Python shell on a node, another job) finds it
by that name and leaves requests; the driver takes them at the next step boundary and reports
back the last finished step and the pool's size.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlfleet.common.records import ScaleDecision

NAMESPACE = "rlfleet"
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in the driver


def run_key(run_dir: str | Path) -> str:
    """This run's control key: the Ray job submission id inside a submitted job, else the
    absolute run folder."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if raw:
        submission_id = json.loads(raw).get("metadata", {}).get("job_submission_id")
        if submission_id:
            return submission_id
    return str(Path(run_dir).resolve())


def actor_name(key: str) -> str:
    return f"rlfleet-control:{key}"


@dataclass(frozen=True)
class ControlStatus:
    """What the driver last reported."""

    step: int
    """Last finished training step (0 before the first)."""
    rollout_workers: int
    pending_rollout_workers: int | None
    """A request not yet applied."""
    ticket: int = 0
    """Requests taken so far, this one included (a `ScaleDecision` answers its ticket)."""


class RunControl:
    """Requests from outside the driver, taken between steps (an actor, so any process of the
    cluster can reach it by name)."""

    def __init__(self) -> None:
        self._pending: int | None = None
        self._step = 0
        self._workers = 0
        self._ticket = 0
        self._decision: ScaleDecision | None = None

    def request_rollout_workers(self, k: int) -> ControlStatus:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"--rollout-workers must be a whole number >= 1 (got {k!r})")
        self._pending = k
        self._ticket += 1
        return self.status()

    def take(self, step: int, rollout_workers: int) -> tuple[int | None, int]:
        """Driver: report progress; returns the pending worker count (and clears it) and its ticket."""
        self._step, self._workers = step, rollout_workers
        pending, self._pending = self._pending, None
        return pending, self._ticket

    def decide(self, decision: ScaleDecision) -> None:
        """Driver: what it did with the request of `decision.ticket`."""
        self._decision = decision

    def decision(self) -> ScaleDecision | None:
        """The last request's outcome (None before any)."""
        return self._decision

    def status(self) -> ControlStatus:
        return ControlStatus(self._step, self._workers, self._pending, self._ticket)


def start_control(key: str) -> Any:
    """The run's control actor (owned by the driver: it goes when the driver goes). A stale
    actor of the same name, left by a driver that died, is replaced."""
    name = actor_name(key)
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass
    # on the driver's own node: a 0-CPU actor may land on any node, and one on a rollout node
    # would go with that node (a lost node must not take the run's control with it)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = ray.remote(RunControl).options(name=name, namespace=NAMESPACE, num_cpus=0,
                                            scheduling_strategy=here).remote()
    return handle  # not awaited: a named actor's name is registered at creation; its process starts beside the run's


def find_control(key: str, wait_s: float = 0.0) -> Any:
    """The control actor of a running job. A job that was just submitted may still be starting
    (installing its runtime env, loading data, joining Ray) before its driver creates the
    actor: wait up to `wait_s` for it, then fail with a clear error."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get_actor(actor_name(key), namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    raise LookupError(
        f"no running rlfleet job {key!r} on this Ray cluster: its control actor {actor_name(key)!r} "
        f"did not appear in namespace {NAMESPACE!r} within {wait_s:g} s (a job that has ended has "
        "none); give the submission id that `rlfleet submit` / `ray job submit` printed, or a local "
        "run's absolute run folder"
    )

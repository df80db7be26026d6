"""The cluster section of the run configuration: Ray resources, threads and placement per role."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlfleet.common.config_base import Section


class RoleResources(Section):
    """Ray resources of one actor of a role."""

    num_cpus: float = Field(1.0, ge=0)
    """CPUs per actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per actor."""
    resources: dict[str, float] = {}
    """Custom Ray resources (e.g. a node label such as {'rollout': 1})."""
    threads: int | None = Field(None, ge=1)
    """Intra-op (torch/OpenMP) threads of each actor of the role. None: the thread budget —
    the node's cores divided among the actors that compute at the same time in the role's
    phase (the synchronous loop runs one phase at a time); an actor with a GPU gets its
    `num_cpus` (at least 1). See rlfleet.common.threads."""
    cores: list[int] | None = None
    """Pin the role's actors to these cores of their node (Linux); the thread budget then
    divides these cores instead of the node's. None: the scheduler places them."""


class ClusterConfig(Section):
    """Where the run executes and what each role gets."""

    address: str | None = None
    """Ray address; None starts a local cluster."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local cluster started by rlfleet; None lets Ray count them."""
    rollout: RoleResources = RoleResources()
    """Resources per rollout worker."""
    learner: RoleResources = RoleResources()
    """Resources per learner actor."""
    reward: RoleResources = RoleResources()
    """Resources of the reward service."""
    reference: RoleResources = RoleResources()
    """Resources of the reference service."""
    environment: RoleResources = RoleResources()
    """Resources per environment host (multi-turn runs; their tools run in its subprocesses)."""
    service_restarts: int = Field(3, ge=0)
    """Times the reward and reference actors are restarted after a crash; the call in flight is
    retried after each restart (the reward normaliser's state restored first). Past it the run
    stops with an error and the last checkpoint is left as it was."""
    service_lost_wait_s: float = Field(120.0, gt=0)
    """When the reward or reference actor's node is lost and no live node offers the resources
    it asks for, how long a call waits for a node to join (Ray's autoscaler adding one) before
    the run stops, naming the service and the node (exit 4; the same command resumes from the
    last complete checkpoint)."""
    learner_placement: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy of the learner group's bundles: PACK keeps the ranks on as
    few nodes as possible (NVLink/fast intra-node collectives), STRICT_PACK insists on one node."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of each GPU the roles run on, for the planner (`rlfleet plan`); None: the local
    GPU's, when there is one."""
    check_fit: bool = True
    """Refuse, before Ray starts, a run the planner says cannot fit its GPUs (false, or
    `rlfleet train --force`: run it anyway)."""

    @model_validator(mode="after")
    def _gpu_shares(self) -> ClusterConfig:
        for role in ("rollout", "learner", "reward", "reference", "environment"):
            gpus = getattr(self, role).num_gpus
            if gpus > 1 and gpus != int(gpus):
                raise ValueError(f"cluster.{role}.num_gpus={gpus:g}: above 1 a share must be a whole number of GPUs")
        return self

"""A run's running actors (`Parts`), started and stopped together: the learner group, the
rollout fleet, the reward and reference services and the environment hosts; and the smaller
set an evaluation of a saved policy needs (`EvalParts`)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
import torch

from rlfleet.common.config import RewardConfig, RoleResources, RuleRewardConfig, RunConfig
from rlfleet.common.precision import resolve_dtype
from rlfleet.common.records import PromptInput, RolloutBatch, SamplingSpec, ScoreBatch
from rlfleet.common.reward_scale import RewardScaler
from rlfleet.common.threads import node_cores
from rlfleet.deploy.actors.assembly import (
    largest_node_cpus,
    needs_reference_actor,
    start_environment_hosts,
    start_reference_service,
    start_reward_service,
    start_rollout_pool,
    thread_budgets,
)
from rlfleet.deploy.actors.learner_group import LearnerGroup
from rlfleet.rollout.pool import PoolStats
from rlfleet.services.client import ReferenceClient, RewardClient
from rlfleet.weight_sync.base import WeightSource

logger = logging.getLogger(__name__)


class Fleet(Protocol):
    """The rollout fleet as the loop drives it: the pool itself (synchronous loop) or the pool
    behind its thread (`overlapped.ThreadedPool`, whose push and rescale are queued)."""

    stats: PoolStats

    @property
    def num_workers(self) -> int: ...

    def generate(self, prompts: Sequence[PromptInput], spec: SamplingSpec) -> RolloutBatch: ...

    def run_episodes(self, examples: Sequence[dict], spec: SamplingSpec) -> RolloutBatch: ...

    def push_weights(self, source: WeightSource) -> list[int] | None: ...

    def scale_to(self, k: int) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...

    def handles(self) -> list[Any]: ...

    def close(self) -> None: ...


class ScoreScale(Protocol):
    """How a run's scores are normalised (the learner's statistics, or a saved policy's fixed ones)."""

    def scale_scores(self, scored: ScoreBatch) -> list[float | None]: ...


@dataclass
class Parts:
    """The running actors of a run (Ray handles) and the fleet that drives the rollout workers."""

    learner: LearnerGroup
    pool: Fleet
    reward: RewardClient | None
    """None in an environment run: the episodes carry their rewards."""
    reference: ReferenceClient | None
    tokenizer_path: str
    gold: bool = False
    """The reward service holds a gold checker (`data.eval_reward` or the task's own rule)."""
    env_hosts: list = field(default_factory=list)
    """The environment hosts of a multi-turn run (the rollout workers play episodes on them)."""

    @property
    def service_retries(self) -> int:
        """Reward and reference calls made again because their actor died."""
        return sum(c.retries for c in (self.reward, self.reference) if c is not None)

    @property
    def scale(self) -> ScoreScale:
        """Scores normalised as the learner trains on them (no statistics move)."""
        return self.learner


@dataclass
class EvalParts:
    """What evaluating a saved policy needs: a fleet, the reward (with the gold checker) or the
    environment hosts, and the reward's fixed normalisation."""

    pool: Fleet
    reward: RewardClient | None
    scale: ScoreScale
    gold: bool = False
    env_hosts: list = field(default_factory=list)


class FixedScale:
    """A saved policy's score normalisation: `reward.normalize: fixed` and `reward.clip` apply,
    running statistics do not (they are the learner's)."""

    def __init__(self, reward: RewardConfig):
        self._scaler = RewardScaler.of(reward)

    def scale_scores(self, scored: ScoreBatch) -> list[float | None]:
        return self._scaler(scored.scores, scored.components, scored.weights, update=False)


def required_cpus(cfg: RunConfig) -> float:
    """Logical CPUs the run's actors ask Ray for."""
    c = cfg.cluster
    services = cfg.environment.hosts * c.environment.num_cpus if cfg.environment.enabled else c.reward.num_cpus
    total = cfg.learner.num_workers * c.learner.num_cpus + services + cfg.rollout.num_workers * c.rollout.num_cpus
    return total + (c.reference.num_cpus if needs_reference_actor(cfg) else 0.0)


def connect_ray(cfg: RunConfig) -> bool:
    """Join the running Ray (`cluster.address` or RAY_ADDRESS), else start a local one; True if
    we started it.

    A local cluster gets at least as many logical CPUs as the actors ask for (on a 2-core
    laptop the four roles share the cores; Ray's CPU count is a scheduling label)."""
    if ray.is_initialized():
        return False
    if cfg.cluster.address is not None or os.environ.get("RAY_ADDRESS"):
        # `cluster.address`, else RAY_ADDRESS (set for the driver of a submitted Ray job)
        ray.init(address=cfg.cluster.address)
        return False
    num_cpus = cfg.cluster.num_cpus or max(os.cpu_count() or 1, math.ceil(required_cpus(cfg)))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def check_capacity(cfg: RunConfig) -> None:
    """Fail with the numbers instead of waiting forever for actors Ray cannot place."""
    have = ray.cluster_resources().get("CPU", 0.0)
    need = required_cpus(cfg)
    if have < need:
        raise RuntimeError(
            f"the Ray cluster has {have:g} CPUs; this run's actors ask for {need:g} (learner, reward, "
            "reference and rollout.num_workers × cluster.rollout.num_cpus): lower cluster.*.num_cpus, "
            "raise cluster.num_cpus, or add nodes"
        )


def start_parts(cfg: RunConfig, model: str, tokenizer_path: str, reward_sources: RewardConfig,
                gold: Sequence[RuleRewardConfig]) -> Parts:
    """Start learner, rollout pool, reward and reference actors (the reference only when a KL
    term needs it and it does not live in the learner). `reward_sources`: the run's reward
    config as resolved (a built-in task's own rule added); `gold`: the gold checker's rules."""
    check_capacity(cfg)
    threads = thread_budgets(cfg, largest_node_cpus())
    cores = node_cores()
    logger.info("threads per actor on a %d-core node (cluster.<role>.threads overrides): %s; compute dtype "
                "model.dtype=%s → %s on this node's %s", cores,
                ", ".join(f"{role} {b.describe(cores)}" for role, b in threads.items()), cfg.model.dtype,
                resolve_dtype(local_device(), cfg.model.dtype), local_device().type.upper())
    critic_path = cfg.reward.model_path if cfg.learner.critic_init == "reward_model" else None
    learner = LearnerGroup.start(cfg, model, critic_path, threads=threads["learner"])
    restarts = cfg.cluster.service_restarts
    reward = hosts = None
    if cfg.environment.enabled:  # the environment's rewards score the episodes
        hosts = start_environment_hosts(cfg)
    else:
        reward = start_reward_service(reward_sources, tokenizer_path, cfg.cluster.reward, restarts, gold,
                                      threads["reward"], cfg.model.dtype, cfg.plugins)
    reference = None
    if needs_reference_actor(cfg):
        reference = start_reference_service(model, cfg.reference, cfg.cluster.reference, restarts,
                                            threads["reference"], cfg.model.dtype)
    pool = start_rollout_pool(model, cfg.rollout, cfg.cluster.rollout, seed=cfg.seed, threads=threads["rollout"],
                              environment=cfg.environment, env_hosts=hosts or ())
    services = [h.health.remote() for h in (reward, reference) if h is not None]
    ray.get(services, timeout=600)
    logger.debug("learner ranks built on nodes %s", learner.nodes)  # waits for them
    wait = cfg.cluster.service_lost_wait_s
    return Parts(learner, pool, reward and RewardClient(reward, restarts, needs=_needs(cfg.cluster.reward),
                                                        lost_wait_s=wait),
                 reference and ReferenceClient(reference, restarts, needs=_needs(cfg.cluster.reference),
                                               lost_wait_s=wait), tokenizer_path,
                 gold=bool(gold) or bool(hosts), env_hosts=hosts or [])


def _needs(res: RoleResources) -> dict[str, float]:
    return {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}


def start_eval_parts(cfg: RunConfig, model: str, reward_sources: RewardConfig,
                     gold: Sequence[RuleRewardConfig]) -> EvalParts:
    """A fleet of the saved policy `model` and the reward service (or environment hosts)."""
    threads = thread_budgets(cfg, largest_node_cpus())
    reward = None
    hosts: list = []
    try:
        if cfg.environment.enabled:  # episodes, scored by the environment
            hosts = start_environment_hosts(cfg)
        else:
            reward = start_reward_service(reward_sources, model, cfg.cluster.reward, gold=gold,
                                          threads=threads["reward"], compute_dtype=cfg.model.dtype,
                                          plugins=cfg.plugins)
        pool = start_rollout_pool(model, cfg.rollout, cfg.cluster.rollout, seed=cfg.seed,
                                  threads=threads["rollout"], environment=cfg.environment, env_hosts=hosts)
    except BaseException:
        _kill(reward, *hosts)
        raise
    return EvalParts(pool, reward and RewardClient(reward), FixedScale(cfg.reward), bool(gold), hosts)


def local_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stop_parts(parts: Parts | EvalParts) -> None:
    """Stop every actor of `parts`."""
    parts.pool.close()
    if isinstance(parts, Parts):
        parts.learner.kill()
        _kill(parts.reference and parts.reference.handle)
    _kill(parts.reward and parts.reward.handle, *parts.env_hosts)


def _kill(*handles: Any) -> None:
    for handle in handles:
        if handle is not None:
            ray.kill(handle, no_restart=True)

"""Where roles become Ray actors: `ray.remote(cls).options(...)` with resources from the config."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import ray

from rlfleet.common.config import (
    ReferenceConfig,
    RewardConfig,
    RoleResources,
    RolloutConfig,
    RuleRewardConfig,
    RunConfig,
)
from rlfleet.common.config_env import EnvironmentConfig
from rlfleet.common.threads import ThreadBudget
from rlfleet.learner.step_data import is_async, needs_prepare
from rlfleet.rollout.backends import backend
from rlfleet.rollout.pool import RolloutPool
from rlfleet.services.environment_host import EnvironmentHost
from rlfleet.services.reference import ReferenceService
from rlfleet.services.reward_service import RewardService


def needs_reference_actor(cfg: RunConfig) -> bool:
    """A reference actor exists when a KL term needs the reference and it does not live in the learner."""
    return cfg.reference.enabled and not cfg.reference.colocate_with_learner and cfg.algorithm.kl_in != "none"


def thread_budgets(cfg: RunConfig, cap: int | None = None) -> dict[str, ThreadBudget]:
    """Each role's thread budget (rlfleet.common.threads): in the synchronous loop the rollout
    workers generate together, the reward model scores beside the reference actor (and beside
    the learner's `prepare`, where the update needs old log-probs first), and the data-parallel
    learners train together. In the overlapped loop (`rollout.max_staleness` >= 1) the fleet
    generates while the learner side scores and trains: each side gets half of the node.
    `cap`: the most CPUs a node offers Ray."""
    scorers = (cfg.reward.model_path is not None) + needs_reference_actor(cfg) + needs_prepare(cfg)
    sides = 2 if is_async(cfg) else 1
    shares = {"rollout": cfg.rollout.num_workers * sides, "learner": cfg.learner.num_workers * sides,
              "reward": max(1, scorers) * sides, "reference": max(1, scorers) * sides}
    budgets = {}
    for role, share in shares.items():
        res: RoleResources = getattr(cfg.cluster, role)
        if res.cores and sides > 1:
            share //= sides  # pinned: the role's cores are its own, whatever else runs
        cores = tuple(res.cores) if res.cores else None
        budgets[role] = ThreadBudget(res.threads, share, res.num_cpus if res.num_gpus else None,
                                     len(cores) if cores else cap, cores)
    return budgets


def largest_node_cpus() -> int | None:
    """The most CPUs any live node of the connected Ray cluster offers (None: unknown)."""
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return int(max(cpus)) if cpus and max(cpus) >= 1 else None


def actor_options(res: RoleResources, **extra: Any) -> dict[str, Any]:
    """Ray actor options for one role's resources."""
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.resources:
        opts["resources"] = dict(res.resources)
    opts.update(extra)
    return opts


def rollout_worker_factory(
    model_path: str, rollout: RolloutConfig, resources: RoleResources, seed: int = 0,
    threads: ThreadBudget | None = None, environment: EnvironmentConfig | None = None, env_hosts: Sequence = (),
) -> Callable[[], ray.actor.ActorHandle]:
    """A function that starts one rollout worker actor (engine built in its constructor; with
    `env_hosts`, it plays multi-turn episodes against them).

    Workers restart up to `rollout.max_restarts` times; a call in flight when one dies fails
    (no automatic retry) so that the pool re-runs its groups and re-syncs the worker.
    """
    worker = backend(rollout.backend)
    cls = ray.remote(worker)
    options = actor_options(
        resources,
        max_restarts=rollout.max_restarts,
        max_task_retries=0,
        scheduling_strategy=rollout.placement,
        max_concurrency=worker.capabilities.calls_at_once,
    )
    counter = itertools.count()

    def spawn() -> ray.actor.ActorHandle:
        # Each worker gets its own engine seed so that unseeded requests differ across workers.
        if env_hosts:
            return cls.options(**options).remote(model_path, rollout, seed + next(counter), threads, environment,
                                                 list(env_hosts))
        return cls.options(**options).remote(model_path, rollout, seed + next(counter), threads)

    return spawn


def start_rollout_pool(
    model_path: str, rollout: RolloutConfig, resources: RoleResources, seed: int = 0,
    threads: ThreadBudget | None = None, environment: EnvironmentConfig | None = None, env_hosts: Sequence = (),
) -> RolloutPool:
    """A rollout pool of `rollout.num_workers` workers of `rollout.backend`."""
    spawn = rollout_worker_factory(model_path, rollout, resources, seed, threads, environment, env_hosts)
    return RolloutPool(
        spawn,
        rollout.num_workers,
        call_timeout_s=rollout.generate_timeout_s,
        max_redispatch=rollout.max_redispatch,
        interruptible=rollout.partial_rollout,
        streaming=backend(rollout.backend).capabilities.streaming,
        groups_in_flight=rollout.groups_in_flight,
    )


def missing_resources(res: RoleResources, extra: int) -> str:
    """'' when `extra` more actors of `res` fit in the cluster's free resources, else what lacks."""
    if extra <= 0:
        return ""
    free = ray.available_resources()
    need = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
    short = [f"{name} {amount * extra:g} (free {free.get(name, 0.0):g})"
             for name, amount in need.items() if amount and free.get(name, 0.0) < amount * extra - 1e-9]
    return ", ".join(short)


def start_vllm_worker(
    model_path: str, rollout: RolloutConfig, resources: RoleResources, seed: int = 0
) -> ray.actor.ActorHandle:
    """Start one vLLM rollout worker as a Ray actor."""
    vllm_cfg = rollout.model_copy(update={"backend": "vllm"})
    return rollout_worker_factory(model_path, vllm_cfg, resources, seed)()


def start_reward_service(
    reward: RewardConfig, tokenizer_path: str, resources: RoleResources, restarts: int = 0,
    gold: Sequence[RuleRewardConfig] = (), threads: ThreadBudget | None = None, compute_dtype: str = "float32",
    plugins: Sequence[str] = (),
) -> ray.actor.ActorHandle:
    """The reward service actor (with the gold checker's rules, used only at evaluation); its
    constructor checks every source (bad config fails here). Ray restarts it up to `restarts`
    times; its client re-makes a call whose actor died (`services/client.py`)."""
    options = actor_options(resources, max_restarts=restarts, max_task_retries=0)
    return ray.remote(RewardService).options(**options).remote(reward, tokenizer_path, gold, threads, compute_dtype,
                                                                      list(plugins))


def start_reference_service(
    model_path: str, reference: ReferenceConfig, resources: RoleResources, restarts: int = 0,
    threads: ThreadBudget | None = None, compute_dtype: str = "float32",
) -> ray.actor.ActorHandle:
    """The reference-model actor (frozen initial policy), restarted up to `restarts` times."""
    cls = ray.remote(ReferenceService).options(**actor_options(resources, max_restarts=restarts, max_task_retries=0))
    return cls.remote(model_path, reference.micro_batch_size, threads=threads, compute_dtype=compute_dtype)


def start_environment_hosts(cfg: RunConfig) -> list[Any]:
    """`environment.hosts` host actors; Ray restarts one that dies (its episodes are re-run)."""
    env = cfg.environment
    options = actor_options(cfg.cluster.environment, max_restarts=-1, max_task_retries=0)
    cls = ray.remote(EnvironmentHost).options(**options)
    hosts = [cls.remote(env.class_path, env.kwargs, env.tool_paths, env.tool_timeout_s, env.tool_memory_mb)
             for _ in range(env.hosts)]
    try:  # a bad environment or tool fails here, named
        ray.get([h.health.remote() for h in hosts], timeout=300)
    except ray.exceptions.GetTimeoutError as err:
        raise RuntimeError(f"the {env.hosts} environment host(s) of {env.path!r} did not start within 300 s") from err
    return hosts

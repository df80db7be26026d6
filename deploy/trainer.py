"""The Python API: `Trainer(config).fit()`.

    from rlfleet.common.config_io import load_config
    from rlfleet.deploy import Trainer
    summary = Trainer(load_config("examples/grpo_rule.yaml")).fit()

`fit` connects to Ray (or starts a local cluster), builds the tiny model when no model path is
given, loads the prompts, starts the actors, resumes from the newest complete checkpoint
(`checkpoint.resume: auto`), runs the loop in `driver.py`, and stops every actor it started.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoTokenizer

from rlfleet.common.config import RewardConfig, RuleRewardConfig, RunConfig
from rlfleet.common.data import PromptDataset, PromptSampler, build_dataset, read_rows
from rlfleet.common.metrics import MetricsWriter, read_metrics
from rlfleet.common.precision import resolve_dtype
from rlfleet.common.tasks import build_task
from rlfleet.common.threads import node_cores
from rlfleet.common.tiny_models import build_tiny_causal_lm
from rlfleet.deploy import driver, evaluation, run_state
from rlfleet.deploy.assembly import (
    largest_node_cpus,
    needs_reference_actor,
    start_environment_hosts,
    start_reference_service,
    start_reward_service,
    start_rollout_pool,
    thread_budgets,
)
from rlfleet.deploy.checkpoints import CheckpointManager
from rlfleet.deploy.control import find_control, run_key, start_control
from rlfleet.deploy.guard import GoldWatch
from rlfleet.deploy.health import RunHealth
from rlfleet.deploy.learner_group import LearnerGroup
from rlfleet.deploy.pipeline import Pipeline, Synchronous, build_loop
from rlfleet.deploy.preflight import check_inputs, dry_call_rules
from rlfleet.services.client import ReferenceClient, RewardClient
from rlfleet.services.decoding import TextDecoder

logger = logging.getLogger(__name__)
Loop = Synchronous | Pipeline


@dataclass(frozen=True)
class RunData:
    train: PromptDataset
    eval: PromptDataset


def policy_path(cfg: RunConfig, run_dir: Path) -> str:
    """The initial policy: `model.path`, or the tiny model built (once) into the run folder."""
    if cfg.model.path is not None:
        return cfg.model.path
    out = run_dir / "models" / "policy"
    if not (out / "config.json").exists():
        build_tiny_causal_lm(out, seed=cfg.seed, shape=cfg.model.tiny)
    return str(out)


def reward_config(cfg: RunConfig) -> RewardConfig:
    """The reward sources; a built-in task with no other source brings its own rule."""
    r = cfg.reward
    if r.configured_sources() or not cfg.task_checker:
        return r
    rule = build_task(cfg.data.task, cfg.seed, 1).rule
    return r.model_copy(update={"rules": [RuleRewardConfig(function=rule)]})


def reward_fields(cfg: RunConfig) -> list[tuple[str, RuleRewardConfig]]:
    """Every rule function the run will call, with the config field that names it."""
    own = cfg.reward.rules or reward_config(cfg).rules
    field = "reward.rules" if cfg.reward.rules else "data.task's rule"
    out = [(f"{field}[{i}].function" if cfg.reward.rules else field, rule) for i, rule in enumerate(own)]
    return out + [(f"data.eval_reward[{i}].function", rule) for i, rule in enumerate(cfg.data.eval_reward or [])]


def gold_rules(cfg: RunConfig) -> list[RuleRewardConfig]:
    """The gold checker: `data.eval_reward`, else a built-in task's own rule, else none."""
    if cfg.data.eval_reward is not None:
        return list(cfg.data.eval_reward)
    if cfg.task_checker:
        return [RuleRewardConfig(function=build_task(cfg.data.task, cfg.seed, 1).rule)]
    return []


def load_data(cfg: RunConfig, tokenizer) -> RunData:
    d = cfg.data

    def dataset(path: str | None, split: str, size: int) -> PromptDataset:
        rows = read_rows(path) if path is not None else [
            (f"task {d.task} {split} #{i}", row) for i, row in enumerate(build_task(d.task, cfg.seed, size, split).rows)
        ]
        data = build_dataset(rows, tokenizer, d.prompt_key, d.max_prompt_tokens, d.on_long_prompt,
                             source=path or f"task {d.task}")
        if data.dropped_too_long:
            logger.warning("%s: dropped %d prompts longer than data.max_prompt_tokens=%d",
                           data.source, data.dropped_too_long, d.max_prompt_tokens)
        return data

    train = dataset(d.train_path, "train", d.task_size)
    if d.eval_path is not None or d.train_path is None:
        evaluation = dataset(d.eval_path, "test", d.eval_size)
    else:
        evaluation = train
    return RunData(train, evaluation)


class Trainer:
    """Runs one training job described by a `RunConfig`."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.run_dir = Path(config.logging.run_dir)

    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`; returns a summary (steps, last metrics, checkpoint, seconds)."""
        cfg = self.config
        started = time.perf_counter()
        check_inputs(cfg)  # bad paths and rules fail before anything starts or is written
        self.run_dir.mkdir(parents=True, exist_ok=True)
        model = policy_path(cfg, self.run_dir)
        tokenizer_path = cfg.model.tokenizer_path or model
        data = load_data(cfg, AutoTokenizer.from_pretrained(tokenizer_path))  # bad data fails before Ray starts
        if cfg.run_health.dry_call and not cfg.environment.enabled:  # reward code that cannot score fails here too
            dry_call_rules(reward_fields(cfg), TextDecoder(tokenizer_path).batch_decode([data.train.examples[0].prompt_ids])[0],
                           data.train.examples[0].extra)
        own_ray = connect_ray(cfg)
        parts = control = None
        try:
            control = start_control(run_key(self.run_dir))
            parts = start_parts(cfg, model, tokenizer_path)
            summary = self._loop(parts, data, control)
        finally:
            if parts is not None:
                stop_parts(parts)
            if control is not None:
                ray.kill(control, no_restart=True)
            if own_ray:
                ray.shutdown()
        summary["seconds"] = time.perf_counter() - started
        return summary

    def scale_rollout(self, k: int) -> None:
        """Ask the running `fit` (in another thread or process) for `k` rollout workers; applied
        at the next step boundary (`rlfleet scale` does the same from a shell)."""
        ray.get(find_control(run_key(self.run_dir)).request_rollout_workers.remote(k))

    def _loop(self, parts: driver.Parts, data: RunData, control: Any) -> dict[str, Any]:
        cfg = self.config
        ckpts = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last)
        sampler = PromptSampler(len(data.train), cfg.seed, cfg.data.shuffle)
        metrics = MetricsWriter(self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb_project,
                                cfg.model_dump(mode="json"))
        first = run_state.resume(cfg, parts, sampler, ckpts, metrics) + 1
        loop = build_loop(cfg, parts, data.train, sampler)
        watch = GoldWatch(cfg.guard, cfg.checkpoint)
        if first == 1:
            ckpts.forget_best()
        else:
            watch.replay(read_metrics(self.run_dir), first - 1)
        progress = _progress(cfg, first - 1)
        health = RunHealth(cfg)
        last: dict[str, Any] = {}
        before: dict[str, Any] = {}
        stopped = None
        try:
            if first == 1 and cfg.logging.eval_every_steps:
                before = evaluation.evaluate(cfg, parts, data.eval, 0)  # the starting policy, as step 0
                metrics.write(0, before)
                self._watch(watch, ckpts, parts, loop, 0, before)
            for step in range(first, cfg.total_steps + 1):
                driver.apply_control(cfg, parts, control, step - 1)
                parts.unscorable.step = step
                last = loop.step(step)
                evaluated = cfg.logging.eval_every_steps and step % cfg.logging.eval_every_steps == 0
                if evaluated:
                    last.update(evaluation.evaluate(cfg, parts, data.eval, step))
                metrics.write(step, last)
                health.see(step, last, parts.unscorable)  # a run that cannot learn stops here, named
                if run_state.checkpoint_due(cfg, step):
                    run_state.save_checkpoint(cfg, parts, ckpts, loop.position(), step)
                _report(progress, step, last)
                stopped = self._watch(watch, ckpts, parts, loop, step, last) if evaluated else None
                if stopped:
                    self._save_once(ckpts, parts, loop, step)  # the last state, beside the best
                    break
        finally:
            metrics.close()
            if progress is not None:
                progress.close()
        health.finish(cfg.total_steps - first + 1 if not stopped else step - first + 1)
        best, checkpoint = ckpts.best(), ckpts.latest()  # best-by-metric saves may come after the last due one
        return {"steps": step if stopped else cfg.total_steps, "first_step": first, "metrics": last,
                "updates": health.updates, "health_warnings": list(health.warned),
                "eval_before": before, "checkpoint": str(checkpoint) if checkpoint else None,
                "best_checkpoint": best, "stopped_by_guard": stopped, "run_dir": str(self.run_dir)}

    def _watch(self, watch: GoldWatch, ckpts: CheckpointManager, parts: driver.Parts, loop: Loop,
               step: int, evaluation: dict[str, Any]) -> str | None:
        """Keep the best checkpoint and apply the over-optimisation guard after an evaluation;
        the reason the run must stop, else None."""
        cfg = self.config
        verdict = watch.see(step, evaluation)
        if verdict.best:
            self._save_once(ckpts, parts, loop, step)
            ckpts.mark_best(step, cfg.checkpoint.keep_best, evaluation[cfg.checkpoint.keep_best])
            logger.info("step %d: best %s so far (%.4g), checkpoint kept", step, cfg.checkpoint.keep_best,
                        evaluation[cfg.checkpoint.keep_best])
        if verdict.act is None:
            return None
        if cfg.guard.action == "raise_kl":
            beta = parts.learner.scale_kl_coef(cfg.guard.kl_factor)
            logger.warning("step %d: %s; KL coefficient raised ×%g to %.4g", step, verdict.act,
                           cfg.guard.kl_factor, beta)
            return None
        best = ckpts.best()
        logger.warning("step %d: %s; stopping (guard.action=stop)%s", step, verdict.act,
                       f", the result is the best checkpoint {best['path']}" if best else "")
        return verdict.act

    def _save_once(self, ckpts: CheckpointManager, parts: driver.Parts, loop: Loop, step: int) -> None:
        """A checkpoint of `step` unless this step already has a complete one."""
        if ckpts.latest() != ckpts.folder(step):
            run_state.save_checkpoint(self.config, parts, ckpts, loop.position(), step)


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str | Path) -> dict[str, Any]:
    """Greedy answers of a saved policy to the eval prompts, scored by the run's reward sources."""
    check_inputs(cfg, checkpoint=str(checkpoint))
    folder = Path(checkpoint)
    model = folder / "learner" / "policy" if (folder / "learner" / "policy").is_dir() else folder
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a checkpoint folder nor an HF model folder")
    tokenizer_path = str(model)
    own_ray = connect_ray(cfg)
    pool = reward = None
    hosts: list = []
    try:
        data = load_data(cfg, AutoTokenizer.from_pretrained(tokenizer_path))
        gold = gold_rules(cfg)
        threads = thread_budgets(cfg, largest_node_cpus())
        if cfg.environment.enabled:  # episodes, scored by the environment
            hosts = start_environment_hosts(cfg)
        else:
            reward = start_reward_service(reward_config(cfg), tokenizer_path, cfg.cluster.reward, gold=gold,
                                          threads=threads["reward"], compute_dtype=cfg.model.dtype,
                                          plugins=cfg.plugins)
        pool = start_rollout_pool(str(model), cfg.rollout, cfg.cluster.rollout, seed=cfg.seed,
                                  threads=threads["rollout"], environment=cfg.environment, env_hosts=hosts)
        parts = driver.Parts(None, pool, reward and RewardClient(reward), None, tokenizer_path, gold=bool(gold),
                             env_hosts=hosts)
        metrics = evaluation.evaluate(cfg, parts, data.eval)
    finally:
        if pool is not None:
            pool.close()
        for handle in (reward, *hosts):
            if handle is not None:
                ray.kill(handle, no_restart=True)
        if own_ray:
            ray.shutdown()
    return {"checkpoint": str(folder), "policy": str(model), **metrics}


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


def start_parts(cfg: RunConfig, model: str, tokenizer_path: str) -> driver.Parts:
    """Start learner, rollout pool, reward and reference actors (the reference only when a KL
    term needs it and it does not live in the learner)."""
    check_capacity(cfg)
    threads = thread_budgets(cfg, largest_node_cpus())
    cores = node_cores()
    logger.info("threads per actor on a %d-core node (cluster.<role>.threads overrides): %s; compute dtype "
                "model.dtype=%s → %s on this node's %s", cores,
                ", ".join(f"{role} {b.describe(cores)}" for role, b in threads.items()), cfg.model.dtype,
                resolve_dtype(_local_device(), cfg.model.dtype), _local_device().type.upper())
    critic_path = cfg.reward.model_path if cfg.learner.critic_init == "reward_model" else None
    learner = LearnerGroup.start(cfg, model, critic_path, threads=threads["learner"])
    restarts = cfg.cluster.service_restarts
    gold = gold_rules(cfg)
    reward = hosts = None
    if cfg.environment.enabled:  # the environment's rewards score the episodes
        hosts = start_environment_hosts(cfg)
    else:
        reward = start_reward_service(reward_config(cfg), tokenizer_path, cfg.cluster.reward, restarts, gold,
                                      threads["reward"], cfg.model.dtype, cfg.plugins)
    reference = None
    if needs_reference_actor(cfg):
        reference = start_reference_service(model, cfg.reference, cfg.cluster.reference, restarts,
                                            threads["reference"], cfg.model.dtype)
    pool = start_rollout_pool(model, cfg.rollout, cfg.cluster.rollout, seed=cfg.seed, threads=threads["rollout"],
                              environment=cfg.environment, env_hosts=hosts or ())
    services = [h.health.remote() for h in (reward, reference) if h is not None]
    ray.get(services, timeout=600)
    learner.version()  # the learners are built
    return driver.Parts(learner, pool, reward and RewardClient(reward, restarts),
                        reference and ReferenceClient(reference, restarts), tokenizer_path,
                        gold=bool(gold) or bool(hosts), env_hosts=hosts or [])


def _local_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stop_parts(parts: driver.Parts) -> None:
    parts.pool.close()
    parts.learner.kill()
    for handle in (parts.reward and parts.reward.handle, parts.reference and parts.reference.handle, *parts.env_hosts):
        if handle is not None:
            ray.kill(handle, no_restart=True)


def _progress(cfg: RunConfig, done: int):
    if not cfg.logging.progress_bar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.total_steps, initial=done, desc="rlfleet", unit="step")


def _report(progress, step: int, m: dict[str, Any]) -> None:
    keys = {"reward": "reward", "objective/kl": "kl", "rollout/logprob_diff": "lp_diff", "timing/generate": "gen_s"}
    shown = {short: f"{m[k]:.3g}" for k, short in keys.items() if m.get(k) is not None}
    if progress is not None:
        progress.set_postfix(shown, refresh=False)
        progress.update(1)
    logger.info("step %d %s", step, " ".join(f"{k}={v}" for k, v in shown.items()))

"""The Python API: `Trainer(config).fit()`.

    from rlfleet.common.config_io import load_config
    from rlfleet.deploy import Trainer
    summary = Trainer(load_config("examples/grpo_rule.yaml")).fit()

`fit` checks the inputs, connects to Ray (or starts a local cluster), builds the tiny model when
no model path is given, loads the prompts, starts the actors (`actors/parts.py`), resumes from
the newest complete checkpoint (`checkpoint.resume: auto`), runs the loop (`loop/`) with its
watchers between steps, and stops every actor it started.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer

from rlfleet.common.config import RunConfig
from rlfleet.common.data import PromptSampler
from rlfleet.common.metrics import MetricsWriter, read_metrics
from rlfleet.common.records import ScaleDecision
from rlfleet.deploy.actors.parts import (
    Parts,
    connect_ray,
    start_eval_parts,
    start_parts,
    stop_parts,
)
from rlfleet.deploy.app.control import find_control, run_key, start_control
from rlfleet.deploy.app.inputs import (
    RunData,
    gold_rules,
    load_data,
    policy_path,
    reward_config,
    reward_fields,
)
from rlfleet.deploy.app.plan import check_fits
from rlfleet.deploy.app.preflight import check_inputs, dry_call_rules
from rlfleet.deploy.loop import Loop, build_loop, evaluation, run_state
from rlfleet.deploy.loop.autoscale import Autoscaler
from rlfleet.deploy.loop.checkpoints import CheckpointManager
from rlfleet.deploy.loop.guard import GoldWatch
from rlfleet.deploy.loop.health import RunHealth, UnscorableLog
from rlfleet.deploy.loop.scaling import CONTROL_TIMEOUT_S, apply_control
from rlfleet.services.decoding import TextDecoder

logger = logging.getLogger(__name__)


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
        check_fits(cfg)  # so does a run that cannot fit its GPUs (`rlfleet plan`)
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
            parts = start_parts(cfg, model, tokenizer_path, reward_config(cfg), gold_rules(cfg))
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

    def scale_rollout(self, k: int, wait_s: float = 300.0) -> ScaleDecision | None:
        """Ask this Trainer's running `fit` (in another thread) for `k` rollout workers; applied
        at the next step boundary (`rlfleet scale` does the same from a shell). Returns what the
        driver decided — granted, unchanged, or refused with the resources the cluster lacks —
        or None when no step boundary came within `wait_s`. With no `fit` running it raises and
        starts nothing (no Ray instance)."""
        if not ray.is_initialized():
            raise RuntimeError("Trainer.scale_rollout: no fit() of this Trainer is running (not started, or ended); "
                               "nothing was started. Call it while fit() runs in another thread, or set "
                               "rollout.num_workers for the next run")
        try:
            control = find_control(run_key(self.run_dir))
        except LookupError as err:
            raise RuntimeError(f"Trainer.scale_rollout: no fit() of this Trainer is running ({err})") from None
        ticket = ray.get(control.request_rollout_workers.remote(k), timeout=CONTROL_TIMEOUT_S).ticket
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            decision = ray.get(control.decision.remote(), timeout=CONTROL_TIMEOUT_S)
            if decision is not None and decision.ticket >= ticket:
                return decision
            time.sleep(0.2)
        return None

    def _loop(self, parts: Parts, data: RunData, control: Any) -> dict[str, Any]:
        cfg = self.config
        ckpts = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last)
        sampler = PromptSampler(len(data.train), cfg.seed, cfg.data.shuffle)
        metrics = MetricsWriter(self.run_dir, cfg.logging.tensorboard, cfg.logging.wandb_project,
                                cfg.model_dump(mode="json"))
        first = run_state.resume(cfg, parts, sampler, ckpts, metrics) + 1
        unscorable = UnscorableLog()
        loop = build_loop(cfg, parts, data.train, sampler, unscorable)
        watch = GoldWatch(cfg.guard, cfg.checkpoint)
        if first == 1:
            ckpts.forget_best()
        else:
            watch.replay(read_metrics(self.run_dir), first - 1)
        progress = _progress(cfg, first - 1)
        health = RunHealth(cfg)
        autoscaler = Autoscaler(cfg)
        last: dict[str, Any] = {}
        before: dict[str, Any] = {}
        stopped = None
        try:
            if first == 1 and cfg.logging.eval_every_steps:
                before = evaluation.evaluate(cfg, parts, data.eval, 0)  # the starting policy, as step 0
                metrics.write(0, before)
                self._watch(watch, ckpts, parts, loop, 0, before)
            for step in range(first, cfg.total_steps + 1):
                scaled = {**apply_control(cfg, parts, control, step - 1), **autoscaler.decide(parts, step - 1)}
                unscorable.step = step
                try:
                    last = {**loop.step(step), **scaled}
                except Exception as err:
                    lost = run_state.role_lost(cfg, parts, ckpts, step, err)
                    if lost is None:
                        raise
                    raise lost from err
                evaluated = cfg.logging.eval_every_steps and step % cfg.logging.eval_every_steps == 0
                if evaluated:
                    last.update(evaluation.evaluate(cfg, parts, data.eval, step))
                metrics.write(step, last)
                autoscaler.see(last)
                health.see(step, last, unscorable)  # a run that cannot learn stops here, named
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

    def _watch(self, watch: GoldWatch, ckpts: CheckpointManager, parts: Parts, loop: Loop,
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

    def _save_once(self, ckpts: CheckpointManager, parts: Parts, loop: Loop, step: int) -> None:
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
    own_ray = connect_ray(cfg)
    parts = None
    try:
        data = load_data(cfg, AutoTokenizer.from_pretrained(str(model)))
        parts = start_eval_parts(cfg, str(model), reward_config(cfg), gold_rules(cfg))
        metrics = evaluation.evaluate(cfg, parts, data.eval)
    finally:
        if parts is not None:
            stop_parts(parts)
        if own_ray:
            ray.shutdown()
    return {"checkpoint": str(folder), "policy": str(model), **metrics}


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

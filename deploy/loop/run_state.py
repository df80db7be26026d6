"""A run's saved state from the loop's side: resuming from the newest complete checkpoint,
writing one, and when one is due."""

from __future__ import annotations

import logging
from pathlib import Path

from rlfleet.common.config import RunConfig
from rlfleet.common.data import PromptSampler
from rlfleet.common.metrics import MetricsWriter
from rlfleet.deploy.actors.parts import Parts
from rlfleet.deploy.loop.checkpoints import CheckpointManager, read_state
from rlfleet.deploy.loop.stages import push_weights

logger = logging.getLogger(__name__)


def resume(cfg: RunConfig, parts: Parts, sampler: PromptSampler, ckpts: CheckpointManager,
           metrics: MetricsWriter) -> int:
    """Restore the newest complete checkpoint (resume: auto) and push its weights; the step it
    ended (0 for a fresh run)."""
    for folder in ckpts.remove_partial():
        logger.warning("removed %s: a checkpoint left half-written by a crash", folder)
    latest = ckpts.latest() if cfg.checkpoint.resume == "auto" else None
    if latest is None:
        metrics.truncate_after(-1)  # a fresh run starts a fresh file
        return 0
    state = read_state(latest)
    version = parts.learner.load(str(latest / "learner"), state.get("reward"))  # "reward": an older checkpoint's
    sampler.load_state_dict(state["data"])
    metrics.truncate_after(state["step"])
    push_weights(cfg, parts, version)
    logger.info("resumed from %s (step %d, policy version %d)", latest, state["step"], version)
    return state["step"]


def save_checkpoint(cfg: RunConfig, parts: Parts, ckpts: CheckpointManager, position: dict, step: int) -> Path:
    """The learner (with the reward normaliser's statistics) and the sampler `position` (the
    overlapped loop's: before its batches in flight), as checkpoint `step`."""
    def write(folder: Path) -> None:
        parts.learner.save(str(folder / "learner"))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(parts.tokenizer_path).save_pretrained(folder / "learner" / "policy")

    return ckpts.save(step, write, {"data": position})


def checkpoint_due(cfg: RunConfig, step: int) -> bool:
    every = cfg.checkpoint.every_steps
    return step == cfg.total_steps or (every > 0 and step % every == 0)


class LearnerLostError(RuntimeError):
    """The learner (a rank of it) is gone: its node lost, or its process killed. The run stops;
    the same command resumes from the last complete checkpoint once the learner can be placed."""

    exit_code = 4


def learner_lost(cfg: RunConfig, parts: Parts, ckpts: CheckpointManager, step: int,
                 err: BaseException) -> LearnerLostError | None:
    """The error to stop with when `err` (raised at `step`) came from losing the learner, else None."""
    lost = parts.learner.lost()
    if lost is None:
        return None
    latest = ckpts.latest()
    where = (f"The last complete checkpoint is {latest} (step {read_state(latest)['step']}); run the same command "
             "again to resume there" if latest is not None else
             "No checkpoint was written yet (checkpoint.every_steps); the same command starts over")
    wants = cfg.cluster.learner
    return LearnerLostError(
        f"the learner was lost at step {step}: {lost} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"{where} once the cluster can place the learner again (cluster.learner: num_cpus={wants.num_cpus}, "
        f"num_gpus={wants.num_gpus}, resources={dict(wants.resources)}).")

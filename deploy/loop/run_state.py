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
from rlfleet.services.client import ServiceError

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


class LostError(RuntimeError):
    """A role the run cannot go on without is gone with its node and cannot be placed again:
    the run stops (exit 4) naming it and the last complete checkpoint, where the same command
    resumes once the cluster can place it."""

    exit_code = 4


class LearnerLostError(LostError):
    """The learner (a rank of it) is gone: its node lost, or its process killed."""


class ServiceLostError(LostError):
    """The reward or reference actor's node is lost and no live node can host it."""


def _resume_hint(ckpts: CheckpointManager) -> str:
    latest = ckpts.latest()
    return (f"The last complete checkpoint is {latest} (step {read_state(latest)['step']}); run the same command "
            "again to resume there" if latest is not None else
            "No checkpoint was written yet (checkpoint.every_steps); the same command starts over")


def role_lost(cfg: RunConfig, parts: Parts, ckpts: CheckpointManager, step: int,
              err: BaseException) -> LostError | None:
    """The error to stop with when `err` (raised at `step`) came from losing the learner or a
    service with its node, else None."""
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, ServiceError) and cause.node_lost):
        cause = cause.__cause__ or cause.__context__  # the overlapped loop re-raises its threads' errors
    if cause is not None:
        return ServiceLostError(f"the run stopped at step {step}: {cause}. {_resume_hint(ckpts)} once a node "
                                "offers those resources.")
    lost = parts.learner.lost()
    if lost is None:
        return None
    wants = cfg.cluster.learner
    return LearnerLostError(
        f"the learner was lost at step {step}: {lost} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"{_resume_hint(ckpts)} once the cluster can place the learner again (cluster.learner: "
        f"num_cpus={wants.num_cpus}, num_gpus={wants.num_gpus}, resources={dict(wants.resources)}).")

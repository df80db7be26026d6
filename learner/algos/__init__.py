"""Pure RL math: tensors and floats in, tensors out. Imports only torch and rlfleet.common.

Conventions are written out in docs/algorithms/. Notation in every module: B responses,
T response length, G responses per prompt, V vocabulary; `mask[b, t] = 1` exactly where the
policy sampled the token.
"""

from __future__ import annotations

from rlfleet.common.registry import Registry, UnknownNameError
from rlfleet.learner.algos.advantages import (
    discounted_returns,
    gae,
    grpo_advantages,
    last_token_index,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rlfleet.learner.algos.estimators import ADVANTAGE_ESTIMATORS, AdvantageInputs, EstimatorInfo
from rlfleet.learner.algos.kl import AdaptiveKLController, FixedKLController, kl_penalty
from rlfleet.learner.algos.losses import (
    dpo_loss,
    entropy_from_logits,
    logprobs_from_logits,
    reward_model_loss,
    value_loss,
)
from rlfleet.learner.algos.masked import (
    agg_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from rlfleet.learner.algos.policy_losses import POLICY_LOSSES, LossInfo, ppo_policy_loss
from rlfleet.learner.algos.rollout_correction import off_policy_metrics, rollout_correction

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "AdvantageInputs",
    "EstimatorInfo",
    "FixedKLController",
    "LossInfo",
    "Registry",
    "UnknownNameError",
    "agg_loss",
    "discounted_returns",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "off_policy_metrics",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "reward_model_loss",
    "rloo_advantages",
    "rollout_correction",
    "token_level_rewards",
    "value_loss",
]

"""From the config and a step's tensors to the inputs of the registered math: the advantage
estimator's `AdvantageInputs` and the policy loss's parameters.

Notation: B responses, T longest response in the step, K reward sources.
"""

from __future__ import annotations

import torch

from rlfleet.common.config import AlgorithmConfig
from rlfleet.common.records import Experience
from rlfleet.learner.algos import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInputs,
    agg_loss,
    kl_penalty,
)

_CLIP = ("clip_low", "clip_high", "dual_clip")


def loss_params(algo: AlgorithmConfig, generator: torch.Generator | None = None) -> dict:
    """The keyword parameters of `algo.policy_loss` that the config sets (the rest keep the
    loss's own defaults); `generator` for a loss that draws at random (clip_cov)."""
    wanted = POLICY_LOSSES[algo.policy_loss].info.params
    given = {name: getattr(algo, name) for name in _CLIP} | algo.loss.model_dump()
    # None is "the loss's default", except for dual_clip, whose None in the config means off
    params = {name: value for name, value in given.items()
              if name in wanted and (value is not None or name == "dual_clip")}
    if "generator" in wanted and generator is not None:
        params["generator"] = generator
    return params


def advantage_inputs(algo: AlgorithmConfig, exp: Experience, token_rewards_BT: torch.Tensor, scores_B: torch.Tensor,
                     group_ids_B: torch.Tensor, mask_BT: torch.Tensor, values_BT: torch.Tensor | None,
                     old_BT: torch.Tensor | None = None, sum_pi_squared_BT: torch.Tensor | None = None,
                     is_weights_BT: torch.Tensor | None = None) -> AdvantageInputs:
    """Everything the configured estimator may read, as tensors on the mask's device."""
    dev, dtype = mask_BT.device, scores_B.dtype
    est = algo.estimator
    baselines = None if exp.baselines is None else torch.tensor(exp.baselines, dtype=dtype, device=dev)
    components = weights = None
    if exp.components:
        names = list(exp.components)
        components = torch.tensor([[0.0 if v is None else v for v in exp.components[n]] for n in names],
                                  dtype=dtype, device=dev).T
        given = est.component_weights or [(exp.weights or {}).get(n, 1.0) for n in names]
        if len(given) != len(names):
            raise ValueError(f"algorithm.estimator.component_weights has {len(given)} weights for the "
                             f"{len(names)} reward sources {names}")
        weights = torch.tensor(given, dtype=dtype, device=dev)
    return AdvantageInputs(
        token_rewards=token_rewards_BT, scores=scores_B, group_ids=group_ids_B, mask=mask_BT, values=values_BT,
        gamma=algo.gamma, lam=algo.lam, baselines=baselines, old_logprobs=old_BT, sum_pi_squared=sum_pi_squared_BT,
        is_weights=is_weights_BT, reward_components=components, component_weights=weights, eps=est.eps,
        scale_by_std=est.scale_by_std, f_norm=est.f_norm, zero_tail=est.zero_tail,
    )


def policy_objective(algo: AlgorithmConfig, logp_BT: torch.Tensor, entropy_BT: torch.Tensor, t, beta: float,
                     norms: dict, params: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss to minimise, the policy loss alone, its metrics) of one micro-batch `t`
    (`StepTensors` rows): the configured policy loss, + β·KL to the reference when
    `kl_in: loss`, − the entropy bonus; every term aggregated with the same normalisers."""
    pg, metrics = POLICY_LOSSES[algo.policy_loss](
        logp_BT, t.old_logprobs, t.advantages, t.mask, agg=algo.loss_agg, token_weights=t.is_weights, **norms, **params,
    )
    loss = pg
    if algo.kl_in == "loss":
        loss = loss + beta * agg_loss(kl_penalty(logp_BT, t.ref_logprobs, algo.kl_estimator), t.mask, algo.loss_agg,
                                      **norms)
    if algo.entropy_coef > 0:
        loss = loss - algo.entropy_coef * agg_loss(entropy_BT, t.mask, algo.loss_agg, **norms)
    return loss, pg, metrics


def estimator_info(algo: AlgorithmConfig):
    """The configured estimator's capabilities (`EstimatorInfo`)."""
    return ADVANTAGE_ESTIMATORS[algo.advantage_estimator].info

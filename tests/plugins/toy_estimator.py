"""A new advantage estimator, whole: the batch's mean score as the baseline, the same advantage
on every response token. `plugins: [tests.plugins.toy_estimator]` and
`algorithm.advantage_estimator: batch_mean` select it."""

import torch

from rlfleet.learner.algos.estimators import AdvantageInputs, EstimatorInfo, register

SEEN: list[torch.Tensor] = []
"""The scores of each call (for its test)."""


@register("batch_mean", EstimatorInfo())
def batch_mean(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    SEEN.append(x.scores.clone())
    advantages = (x.scores - x.scores.mean())[:, None] * x.mask
    return advantages, advantages

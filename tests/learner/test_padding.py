"""Micro-batches bucketed by length: little padding (`learner/padding_fraction`), same update."""

from __future__ import annotations

import pytest
import torch

from rlfleet.common.records import Experience, Rollout
from rlfleet.learner.learner import Learner
from rlfleet.learner.step_data import token_budget_batches
from tests.learner.test_learner import record_gradients, single_update_config

pytestmark = pytest.mark.unit


def mixed_lengths() -> list[Rollout]:
    """6 responses, short and long in turn (2 and 30 tokens), 3 groups of 2."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        prompt = torch.randint(4, 100, (4,), generator=g).tolist()
        response = torch.randint(4, 100, (2 if i % 2 == 0 else 30,), generator=g).tolist()
        out.append(Rollout(i // 2, prompt, response, [-4.6] * len(response), "length", 0))
    return out


def padding(lengths: list[tuple[int, int]], micros: list[list[int]]) -> float:
    real = sum(sum(lengths[i]) for m in micros for i in m)
    padded = sum(len(m) * (max(lengths[i][0] for i in m) + max(lengths[i][1] for i in m)) for m in micros)
    return 1 - real / padded


def test_length_buckets_cut_padding_and_leave_the_update_alone(tiny_model_dir):
    rollouts = mixed_lengths()
    lengths = [(len(r.prompt_ids), len(r.response_ids)) for r in rollouts]
    budget = 80  # two long sequences per micro-batch
    exp = Experience(rollouts, [1.0, 0.0, 0.3, 0.9, 0.5, 0.2], [r.prompt_index for r in rollouts],
                     None, None, [[-4.5] * len(r.response_ids) for r in rollouts])
    bucketed = Learner(single_update_config(micro_batch_tokens=budget), str(tiny_model_dir))
    grads = record_gradients(bucketed)
    got = bucketed.train_step(exp).metrics["learner/padding_fraction"]
    by_length = sorted(range(6), key=lambda i: (sum(lengths[i]), i))
    assert got == pytest.approx(padding(lengths, list(token_budget_batches(lengths, by_length, budget))), abs=1e-6)
    in_order = padding(lengths, list(token_budget_batches(lengths, list(range(6)), budget)))
    assert got < 0.1 < 0.4 < in_order  # in arrival order every micro-batch pads a short one to 30
    # one micro-batch of all 6: the same gradients (the loss is a token sum over micro-batches)
    whole = Learner(single_update_config(micro_batch_tokens=10_000), str(tiny_model_dir))
    whole_grads = record_gradients(whole)
    whole.train_step(exp)
    assert len(grads) == len(whole_grads) == 1
    for name, g in whole_grads[0].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6, msg=name)

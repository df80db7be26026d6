"""The thread budget: each role's intra-op threads from what it may use in its phase."""

from __future__ import annotations

import pytest
import torch

from rlfleet.common.config import RunConfig
from rlfleet.common.threads import ThreadBudget, apply_thread_budget, node_cores
from rlfleet.deploy.assembly import thread_budgets

pytestmark = pytest.mark.unit


# GRPO, one update on the whole batch: the learner's own log-probs serve, no `prepare`
SINGLE = {"rollout": {"prompts_per_step": 4, "samples_per_prompt": 4},
          "learner": {"ppo_epochs": 1, "minibatch_size": 16},
          "algorithm": {"advantage_estimator": "grpo", "kl_in": "loss"}}


def resolved(cfg: dict, cores: int, cap: int | None = None) -> dict[str, int]:
    merged = {k: {**SINGLE.get(k, {}), **v} if isinstance(v, dict) else v for k, v in {**SINGLE, **cfg}.items()}
    return {role: b.resolve(cores) for role, b in thread_budgets(RunConfig.model_validate(merged), cap).items()}


def test_each_phase_shares_the_node_among_the_actors_that_compute_in_it():
    # GRPO with KL in the loss: a reference actor; rule reward (no reward model)
    assert resolved({}, 8) == {"rollout": 8, "learner": 8, "reward": 8, "reference": 8}
    # 2 rollout workers generate together, 2 data-parallel learners train together
    assert resolved({"rollout": {"num_workers": 2}, "learner": {"num_workers": 2}}, 8) == \
        {"rollout": 4, "learner": 4, "reward": 8, "reference": 8}
    # a reward model scores beside the reference actor: they split the node
    both = resolved({"reward": {"model_path": "rm"}}, 8)
    assert both["reward"] == both["reference"] == 4
    # ... and beside the learner's prepare where the update needs old log-probs first (2 epochs)
    ppo = resolved({"reward": {"model_path": "rm"}, "learner": {"ppo_epochs": 2}}, 8)
    assert ppo["reward"] == ppo["reference"] == 2 and ppo["learner"] == 8
    # never below one thread, and never above the CPUs the Ray cluster offers
    assert resolved({"rollout": {"num_workers": 3}}, 2)["rollout"] == 1
    assert resolved({}, 16, cap=4)["learner"] == 4


def test_a_set_count_wins_and_a_gpu_actor_gets_its_cpu_share():
    cfg = {"cluster": {"learner": {"threads": 3}, "rollout": {"num_gpus": 1, "num_cpus": 2},
                       "reference": {"num_gpus": 0.5, "num_cpus": 0.5}}}
    got = resolved(cfg, 64)
    assert got["learner"] == 3 and got["rollout"] == 2 and got["reference"] == 1
    with pytest.raises(ValueError, match="threads"):
        RunConfig.model_validate({"cluster": {"learner": {"threads": 0}}})
    assert ThreadBudget(share=4).describe(8) == "2 (8 cores / 4 at once)"


def test_applying_a_budget_sets_torchs_threads_and_none_leaves_them():
    before = torch.get_num_threads()
    try:
        assert apply_thread_budget(ThreadBudget(threads=1)) == 1 == torch.get_num_threads()
        assert apply_thread_budget(None) == 1
        assert apply_thread_budget(ThreadBudget()) == node_cores()
    finally:
        torch.set_num_threads(before)

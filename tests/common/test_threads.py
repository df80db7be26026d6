"""The thread budget: each role's intra-op threads from what it may use in its phase."""

from __future__ import annotations

import os

import pytest
import torch

from rlfleet.common.config import RunConfig
from rlfleet.common.threads import ThreadBudget, apply_thread_budget, node_cores
from rlfleet.deploy.actors.assembly import thread_budgets

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


def test_the_overlapped_loop_halves_the_node_between_the_fleet_and_the_learner_side():
    asynchronous = {"rollout": {"max_staleness": 1}}
    assert resolved(asynchronous, 8) == {"rollout": 4, "learner": 4, "reward": 4, "reference": 4}
    assert resolved(asynchronous, 2) == {"rollout": 1, "learner": 1, "reward": 1, "reference": 1}
    # pinned roles divide their own cores only
    pinned = {**asynchronous, "cluster": {"rollout": {"cores": [0, 1, 2]}, "learner": {"cores": [3]}}}
    got = resolved(pinned, 8)
    assert got["rollout"] == 3 and got["learner"] == 1 and got["reward"] == 4
    assert "pinned to cores [0, 1, 2]" in ThreadBudget(cap=3, cores=(0, 1, 2)).describe(8)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_pinned_budget_sets_the_process_affinity_its_threads_inherit():
    """In a child process (the affinity is the process's): pinned to one core, torch computes
    on one thread there, and the threads it starts are pinned too."""
    import subprocess
    import sys

    code = ("import os, torch\n"
            "from rlfleet.common.threads import ThreadBudget, apply_thread_budget\n"
            "n = apply_thread_budget(ThreadBudget(cap=1, cores=(0,)))\n"
            "torch.ones(256, 256) @ torch.ones(256, 256)\n"
            "tids = os.listdir('/proc/self/task')\n"
            "print(n, sorted(os.sched_getaffinity(0)), {tuple(os.sched_getaffinity(int(t))) for t in tids})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split("\n")[0] == "1 [0] {(0,)}"

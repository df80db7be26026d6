"""`learner.offload`: the learner's state leaves its device after the push and comes back
before it next computes; the updates are the same as without it (in-process, no Ray; on a GPU
the move is real: `scripts/gpu_check.sh`)."""

from __future__ import annotations

import pytest
import torch

from rlfleet.common.config import RunConfig
from rlfleet.learner.learner import Learner
from tests.learner.test_learner import experience, make_config, make_rollouts

pytestmark = pytest.mark.unit


def _storage(learner: Learner) -> dict[str, int]:
    """Where each parameter's, gradient's and optimizer state's data lives (pointers)."""
    out = {f"p.{n}": p.data_ptr() for n, p in learner.policy.named_parameters()}
    out.update({f"g.{n}": p.grad.data_ptr() for n, p in learner.policy.named_parameters() if p.grad is not None})
    for i, state in enumerate(learner.optimizer.state.values()):
        out.update({f"o.{i}.{k}": v.data_ptr() for k, v in state.items() if v.dim() > 0})
    return out


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_offloading_between_steps_changes_nothing_the_learner_computes(tiny_model_dir, estimator):
    """Two learners from the same weights and seed, two steps each; one offloads after every step
    (the critic, the colocated reference and the optimizers' state with it). Every metric of
    both steps, and the weights after them, are the same."""
    cfg = make_config(estimator, lora=estimator == "grpo")
    offloading = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"offload": True})})
    plain, moved = Learner(cfg, str(tiny_model_dir)), Learner(offloading, str(tiny_model_dir))
    assert plain.offload() == 0  # off: nothing moves
    results = {id(plain): [], id(moved): []}
    for step in range(2):
        for learner in (plain, moved):
            results[id(learner)].append(learner.train_step(experience(learner, make_rollouts(seed=step, version=step))))
        before = _storage(moved)
        numel = sum(p.numel() for m in (moved.policy, moved.critic) if m is not None for p in m.parameters())
        assert moved.offload() >= 4 * numel  # fp32 parameters at least; their gradients and Adam's moments too
        after = _storage(moved)
        assert all(after[k] != before[k] for k in before)  # every tensor in a new buffer
        assert moved.offload() == 0  # already away
    for a, b in zip(results[id(plain)], results[id(moved)], strict=True):
        assert a.version == b.version
        assert {k: v for k, v in a.metrics.items()} == {k: v for k, v in b.metrics.items()}
    snap_a, snap_b = plain.parameter_snapshot(), moved.parameter_snapshot()
    assert snap_a.keys() == snap_b.keys()
    for name in snap_a:
        assert torch.equal(snap_a[name], snap_b[name]), name


def test_offload_is_refused_where_the_learner_computes_while_the_engines_generate():
    with pytest.raises(ValueError, match=r"learner.offload=true .*\(rollout.max_staleness=0\)"):
        RunConfig.model_validate({"learner": {"offload": True}, "rollout": {"max_staleness": 1}})
    with pytest.raises(ValueError, match="learner.strategy='ddp'"):
        RunConfig.model_validate({"learner": {"offload": True, "strategy": "fsdp", "num_workers": 2}})

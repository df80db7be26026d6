"""bf16 autocast in the learner on CPU: fp32 master weights, gradients and optimizer state, and
gradients close to fp32's."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rlfleet.common.config import RunConfig
from rlfleet.learner.learner import Learner
from tests.learner.test_learner import experience, make_config, make_rollouts, record_gradients

pytestmark = pytest.mark.unit


def _learner(tiny_model_dir, dtype: str) -> Learner:
    cfg = make_config("gae", minibatch_size=6, ppo_epochs=1)
    return Learner(cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})}), str(tiny_model_dir))


def test_bf16_autocast_keeps_fp32_master_state_and_gradients_near_fp32(tiny_model_dir):
    """One PPO step (policy and critic) under bf16 autocast against the same step in fp32. bf16
    keeps 8 bits of mantissa, so each gradient tensor is compared as a direction (cosine ≥ 0.999)
    and a size (norm within 2 %), not element by element (measured here: cosine ≥ 0.9999, norms
    within 0.3 %)."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        learner = _learner(tiny_model_dir, dtype)
        grads = record_gradients(learner)
        learner.train_step(experience(learner, make_rollouts()))
        runs[dtype] = (learner, grads)
    learner, _ = runs["bfloat16"]
    for model, optimizer in ((learner.policy, learner.optimizer), (learner.critic, learner.critic_optimizer)):
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights
        states = [s for s in optimizer.state.values() if s]
        assert states and {s[k].dtype for s in states for k in ("exp_avg", "exp_avg_sq")} == {torch.float32}
    fp32, bf16 = runs["float32"][1], runs["bfloat16"][1]
    assert len(fp32) == len(bf16) == 2  # the policy's and the critic's step
    worst = 1.0
    for exact, mixed in zip(fp32, bf16, strict=True):
        assert exact.keys() == mixed.keys()
        for name, g in exact.items():
            assert mixed[name].dtype == torch.float32
            if g.norm() < 1e-6:
                continue
            cosine = torch.nn.functional.cosine_similarity(g.flatten(), mixed[name].flatten(), dim=0).item()
            worst = min(worst, cosine)
            assert cosine >= 0.999, (name, cosine)
            assert mixed[name].norm().item() == pytest.approx(g.norm().item(), rel=0.02), name
    assert worst < 1.0  # the bf16 run really computed in bf16


def test_fp16_on_cpu_is_refused_by_name_when_the_learner_starts(tiny_model_dir):
    with pytest.raises(ValueError, match="model.dtype='float16' is not supported on CPU"):
        _learner(tiny_model_dir, "float16")


def test_auto_dtype_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    """model.dtype 'auto' (the default): fp32 on a CPU without bf16 matrix units, bf16 autocast
    on one with them; an explicit dtype is kept."""
    from rlfleet.common import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert precision.resolve_dtype(cpu, "auto") == "float32"
    assert isinstance(precision.autocast(cpu, "auto"), contextlib.nullcontext)
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert precision.resolve_dtype(cpu, "auto") == "bfloat16"
    assert precision.autocast(cpu, "auto").fast_dtype == torch.bfloat16
    assert precision.resolve_dtype(cpu, "float32") == "float32"
    assert RunConfig().model.dtype == "auto"

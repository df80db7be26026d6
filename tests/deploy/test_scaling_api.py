"""`Trainer.scale_rollout` with no fit() running raises and starts nothing (a request refused
during a run: tests/deploy/test_training.py::test_grpo_learns_a_rule_reward); what a refusal
says; `rlfleet scale` on a cluster: tests/deploy/test_multinode.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.deploy.test_training import ROOT


@pytest.mark.unit
def test_scaling_with_no_run_raises_and_starts_no_ray(tmp_path):
    code = ("import ray; from rlfleet.common.config import RunConfig; from rlfleet.deploy import Trainer\n"
            f"t = Trainer(RunConfig.model_validate({{'logging': {{'run_dir': {str(tmp_path)!r}}}}}))\n"
            "try:\n    t.scale_rollout(2)\nexcept RuntimeError as err:\n    print('refused:', err)\n"
            "print('ray started:', ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "refused: Trainer.scale_rollout: no fit() of this Trainer is running" in out.stdout, out.stderr[-2000:]
    assert "ray started: False" in out.stdout


@pytest.mark.ray
def test_a_scale_request_the_cluster_cannot_place_is_refused_with_the_numbers(ray_cluster):
    from rlfleet.common.config import RoleResources
    from rlfleet.deploy.loop.scaling import missing_resources

    assert missing_resources(RoleResources(num_cpus=0), 3) == ""
    short = missing_resources(RoleResources(num_cpus=1, resources={"rollout": 1}), 2)
    assert short.startswith("rollout 2 (free 0)")
    assert "CPU 1000 (free" in missing_resources(RoleResources(num_cpus=1000), 1)


@pytest.mark.unit
def test_the_autoscalers_signal_grows_on_the_learners_wait_and_shrinks_on_idle_engines():
    """`rollout.autoscale`'s decision from the steps' timings (the acting on it, on a real
    cluster with a node that joins: tests/deploy/test_multinode.py)."""
    from rlfleet.common.config import RunConfig
    from rlfleet.deploy.loop.autoscale import Autoscaler

    cfg = RunConfig.model_validate({"rollout": {"autoscale": {
        "enabled": True, "min_workers": 1, "max_workers": 3, "grow_above": 0.5, "shrink_above": 0.8, "every_steps": 2}}})
    waits = {"timing/step": 10.0, "timing/generate": 7.0, "timing/generate_busy": 7.0}  # waited 70 %
    idles = {"timing/step": 10.0, "timing/generate": 0.5, "timing/generate_busy": 1.0}  # engines idle 90 %
    busy = {"timing/step": 10.0, "timing/generate": 3.0, "timing/generate_busy": 8.0}  # neither
    scaler = Autoscaler(cfg)
    scaler.see(waits)
    assert scaler._target(2) == (2, "")  # one step seen: every_steps is 2
    scaler.see(waits)
    want, reason = scaler._target(2)
    assert want == 3 and reason == "the learner waited 70% of the last 2 steps for rollouts"
    assert scaler._target(3)[0] == 3  # max_workers
    scaler.see(idles)
    scaler.see(idles)
    assert scaler._target(2) == (1, "the engines idled 90% of the last 2 steps")
    assert scaler._target(1)[0] == 1  # min_workers
    scaler.see(busy)
    scaler.see(busy)
    assert scaler._target(2) == (2, "")
    with pytest.raises(ValueError, match="min_workers=3 > max_workers=2"):
        RunConfig.model_validate({"rollout": {"autoscale": {"min_workers": 3, "max_workers": 2}}})

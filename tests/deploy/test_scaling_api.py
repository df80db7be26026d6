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

"""`Trainer.scale_rollout` with no fit() running raises and starts nothing (a request refused
during a run: tests/deploy/test_training.py::test_grpo_learns_a_rule_reward)."""

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

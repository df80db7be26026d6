"""`Trainer.scale_rollout` tells its caller what happened: a request the cluster cannot place
is refused with the numbers (and the step's metrics say so); with no fit() running it raises
and starts nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from rlfleet.common.metrics import read_metrics
from rlfleet.deploy import Trainer
from tests.deploy.test_training import ROOT, grpo_config


@pytest.mark.ray
@pytest.mark.vllm
def test_a_request_the_cluster_cannot_place_is_refused_to_the_caller(ray_cluster, tmp_path):
    cfg = grpo_config(tmp_path, total_steps=4, checkpoint={"every_steps": 0})
    trainer = Trainer(cfg)
    done: dict = {}
    fit = threading.Thread(target=lambda: done.update(trainer.fit()))
    fit.start()
    decision, deadline = None, time.monotonic() + 300
    while decision is None and fit.is_alive():
        assert time.monotonic() < deadline
        try:
            decision = trainer.scale_rollout(500, wait_s=120)
        except RuntimeError as err:  # the run's control actor is not up yet
            assert "no fit() of this Trainer is running" in str(err)
            time.sleep(0.5)
    fit.join(timeout=600)
    assert decision is not None and decision.outcome == "refused" and decision.requested == 500, decision
    assert decision.reason.startswith("the cluster lacks CPU 499") and decision.rollout_workers == 1
    rows = [r for r in read_metrics(tmp_path) if r.get("rollout/scale_refused") == 1.0]
    assert [r["step"] for r in rows] == [decision.after_step + 1] and rows[0]["rollout/scale_requested"] == 500.0
    assert done["steps"] == 4


@pytest.mark.unit
def test_scaling_with_no_run_raises_and_starts_no_ray(tmp_path):
    code = ("import ray; from rlfleet.common.config import RunConfig; from rlfleet.deploy import Trainer\n"
            f"t = Trainer(RunConfig.model_validate({{'logging': {{'run_dir': {str(tmp_path)!r}}}}}))\n"
            "try:\n    t.scale_rollout(2)\nexcept RuntimeError as err:\n    print('refused:', err)\n"
            "print('ray started:', ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "refused: Trainer.scale_rollout: no fit() of this Trainer is running" in out.stdout, out.stderr[-2000:]
    assert "ray started: False" in out.stdout

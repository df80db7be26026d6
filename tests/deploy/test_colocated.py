"""Colocated mode's place in the loop: `rollout.sleep_between_steps` puts the fleet to sleep
before the learner trains and wakes it before the push (HF backend on CPU: the calls run, the
model stays where it is; the memory it frees on a GPU is the GPU script's to measure)."""

from __future__ import annotations

import pytest

from rlfleet.common.metrics import read_metrics
from rlfleet.deploy import Trainer
from tests.deploy.test_training import grpo_config

pytestmark = [pytest.mark.ray]


def test_the_synchronous_loop_sleeps_the_fleet_through_the_learners_phase(ray_cluster, tmp_path):
    cfg = grpo_config(tmp_path, total_steps=2, rollout={"backend": "hf", "sleep_between_steps": True},
                      checkpoint={"every_steps": 0})
    Trainer(cfg).fit()
    rows = [r for r in read_metrics(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # asleep, trained, awake, pushed: every worker reports the new version
        assert row["timing/sleep"] >= 0 and row["rollout/min_version"] == row["learner/version"] == row["step"]

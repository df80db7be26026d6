"""A run that cannot learn says why, early (`deploy/loop/health.py`, `deploy/app/preflight.py`): reward
code that cannot score stops the run before Ray starts (exit 2) or after `run_health.patience`
steps (exit 3), and a run that learns nothing is warned of, by name and step."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from rlfleet.common.config import RuleRewardConfig
from rlfleet.common.config_io import dump_config
from rlfleet.common.metrics import read_metrics
from rlfleet.deploy import Trainer
from rlfleet.deploy.app import cli
from rlfleet.deploy.app.preflight import dry_call_rules
from tests.deploy.test_training import ROOT, grpo_config

FIX = "tests.services.rule_fixtures"


def _rule(name: str, timeout_s: float = 5.0, style: str = "auto") -> list[tuple[str, RuleRewardConfig]]:
    return [("reward.rules[0].function", RuleRewardConfig(function=f"{FIX}:{name}", timeout_s=timeout_s, style=style))]


@pytest.mark.unit
def test_the_dry_call_names_a_rule_that_raises_hangs_or_returns_a_non_number():
    extra = {"answer": "42"}
    dry_call_rules(_rule("by_length"), "What is 6 x 7?", extra)  # a number: fine
    dry_call_rules(_rule("returns_nan_on_x"), "p", extra)
    dry_call_rules(_rule("verl_style"), "What is 6 x 7?", extra)  # verl's style, detected: fine
    with pytest.raises(Exception, match=r"reward.rules\[0\].function='tests.services.rule_fixtures:verl_style': "
                                        r"it returned dict \{'score': 0.0, 'acc': 1.0\}, not a number.*"
                                        r"rlfleet fn\(prompt, response, extra\) -> float \| None"):
        dry_call_rules(_rule("verl_style", style="rlfleet"), "What is 6 x 7?", extra)  # forced: its dict is refused
    with pytest.raises(Exception, match=r"verl_without_score.*it raised ValueError: returned a dict without 'score'"):
        dry_call_rules(_rule("verl_without_score"), "p", extra)
    with pytest.raises(Exception, match="it raised RuntimeError: broken reward code, when called once before the run "
                                        r"as fn\(prompt, response, extra\) with prompt='p', response='0', "
                                        r"extra with keys \['answer'\]"):
        dry_call_rules(_rule("raises"), "p", extra)
    started = time.monotonic()
    with pytest.raises(Exception, match=r"it did not return within 1 s \(reward.rules\[0\].timeout_s\)"):
        dry_call_rules(_rule("sleeps_forever", timeout_s=1.0), "p", extra)
    assert time.monotonic() - started < 30


@pytest.mark.unit
def test_a_reward_function_of_no_known_style_exits_2_before_ray_starts(tmp_path):
    """`rlfleet train` with a reward function whose signature fits none of the styles rlfleet
    runs (rlfleet, verl, TRL, OpenRLHF): exit 2, the function, its signature and the styles
    accepted; Ray never started."""
    cfg = grpo_config(tmp_path / "run", reward={"rules": [{"function": f"{FIX}:one_argument"}]})
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rlfleet.deploy.app.cli", "train", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "reward.rules[0].function='tests.services.rule_fixtures:one_argument': one_argument(text) fits no " \
           "reward style" in done.stderr
    assert "rlfleet fn(prompt, response, extra)" in done.stderr and "verl compute_score(" in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert time.monotonic() - started < 120


@pytest.mark.ray
@pytest.mark.vllm
def test_a_rule_that_raises_on_every_response_stops_the_run_naming_it(ray_cluster, tmp_path, capsys, caplog):
    """The rule passes the dry call but raises on every generated response: each step drops
    every group, and after `run_health.patience` (3) steps the run stops with exit 3, the
    source, the exception's message and the number of updates (0); step 3's metrics are the last."""
    cfg = grpo_config(tmp_path, total_steps=8, reward={"rules": [{"function": f"{FIX}:raises_on_model_output"}]},
                      checkpoint={"every_steps": 0})
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    with caplog.at_level(logging.WARNING, logger="rlfleet.deploy.loop.health"):
        assert cli.main(["train", str(path)]) == 3
    err = capsys.readouterr().err
    assert "run health: every response of steps 1–3 was unscorable (rules[0]: 32 of 32" in err
    assert "ValueError: cannot parse an answer from" in err and "0 updates made" in err
    assert [r["step"] for r in read_metrics(tmp_path) if r["step"] > 0] == [1, 2, 3]
    # the reason was logged once, at the step it first appeared
    logged = [r.getMessage() for r in caplog.records if "could not score" in r.getMessage()]
    assert logged and logged[0].startswith("run health: step 1: rules[0] could not score a response: raised "
                                           "(ValueError: cannot parse an answer from")


@pytest.mark.ray
@pytest.mark.vllm
def test_a_constant_reward_and_truncated_responses_are_warned_of(ray_cluster, tmp_path, caplog):
    """A constant rule (no spread in any group: GRPO learns nothing) and responses that cannot
    end (max_response_tokens 1): one warning each, with the step numbers; the run completes."""
    cfg = grpo_config(tmp_path, total_steps=3, reward={"rules": [{"function": f"{FIX}:constant_reward"}]},
                      rollout={"max_response_tokens": 1}, checkpoint={"every_steps": 0})
    with caplog.at_level(logging.WARNING, logger="rlfleet.deploy.loop.health"):
        summary = Trainer(cfg).fit()
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run health:")]
    assert any("steps 1–3: every group's responses got the same reward (frac_reward_zero_std 1.0, reward 0.5)"
               in m for m in messages), messages
    assert any("steps 1–3: " in m and "of the responses were cut at rollout.max_response_tokens=1" in m
               for m in messages), messages
    assert summary["updates"] == 3 and set(summary["health_warnings"]) == {"zero_spread", "truncated"}


def _watch(rows: list[dict], **run_health):
    """RunHealth over synthetic step metrics; the warnings it logged."""
    from rlfleet.common.config import RunConfig
    from rlfleet.deploy.loop.health import RunHealth, UnscorableLog

    health = RunHealth(RunConfig.model_validate({"run_health": run_health}))
    for step, row in enumerate(rows, start=1):
        health.see(step, {"rollout/num_samples": 32.0, "reward": 0.5, **row}, UnscorableLog())
    return health


@pytest.mark.unit
def test_each_warning_names_its_cause_once_and_a_learning_run_gets_none(caplog):
    with caplog.at_level(logging.WARNING, logger="rlfleet.deploy.loop.health"):
        quiet = _watch([{"reward": 0.1 * i, "frac_reward_zero_std": 0.2, "completions/clipped_ratio": 0.1,
                         "objective/kl": 0.1 * i, "rollout/logprob_diff_same_version": 1e-4 * i,
                         "policy/entropy_avg": 1.0 / i} for i in range(1, 9)])
        assert quiet.warned == [] and quiet.updates == 8  # KL and gap grow but stay small; entropy falls while reward rises
        growing = _watch([{"objective/kl": 5.0 + i, "rollout/logprob_diff_same_version": 0.02 * i,
                           "policy/entropy_avg": 2.0 if i == 1 else 0.05} for i in range(1, 7)])
    assert growing.warned == ["logprob_gap", "kl", "entropy"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("objective/kl grew every step (6, 7, 8, 9) past 5" in m for m in messages), messages
    assert any("the policy's entropy fell to 0.05 from 2" in m for m in messages), messages
    assert sum("objective/kl grew" in m for m in messages) == 1  # once per cause


@pytest.mark.unit
def test_no_update_for_patience_steps_stops_and_a_run_without_updates_never_ends_quietly():
    from rlfleet.deploy.loop.health import RunHealthError

    with pytest.raises(RunHealthError, match=r"no update was made in steps 2–3 \(the rollout correction rejected "
                                             r"every token: rs_options=None"):
        _watch([{}, {"learner/updated": 0.0}, {"rollout_corr/rollout_rs_masked_fraction": 1.0}], patience=2)
    short = _watch([{"learner/updated": 0.0}, {"learner/updated": 0.0}], patience=3)
    with pytest.raises(RunHealthError, match="ended after 2 steps having made no update"):
        short.finish(2)
    _watch([{}, {"learner/updated": 0.0}], patience=3).finish(2)  # one update: a run that trained

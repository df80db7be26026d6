"""Reward code written for verl, TRL and OpenRLHF, run unmodified by the rule processes
(`services/reward_styles.py`): the style is read from the signature, each gets the arguments
its own framework passes, and what it returns beside the reward is kept as logs."""

from __future__ import annotations

import pytest

from rlfleet.services.reward_styles import detect_style
from rlfleet.services.rules import RuleRunner, load_rule

pytestmark = pytest.mark.unit
FIX = "tests/fixtures/user_rewards"


def test_the_style_is_read_from_the_signature():
    def rlfleet_rule(prompt, response, extra): ...
    def verl(data_source, solution_str, ground_truth, extra_info=None, **kwargs): ...
    def trl(completions, **kwargs): ...
    def trl_full(prompts, completions, completion_ids, answer, **kwargs): ...
    def openrlhf(queries, prompts, labels): ...
    def neither(text): ...

    assert [detect_style(f) for f in (rlfleet_rule, verl, trl, trl_full, openrlhf, neither)] == \
        ["rlfleet", "verl", "trl", "trl", "openrlhf", None]
    assert load_rule(f"{FIX}/verl_reward.py:compute_score", "f") == "verl"  # a file path, as verl takes it
    assert load_rule("tests.fixtures.user_rewards.trl_rewards:letter_share", "f") == "trl"
    with pytest.raises(ValueError, match=r"f='tests.services.rule_fixtures:one_argument': one_argument\(text\) fits "
                                         r"no reward style.*OpenRLHF reward_func\(queries, prompts, labels\)"):
        load_rule("tests.services.rule_fixtures:one_argument", "f")
    with pytest.raises(ValueError, match="no such file"):
        load_rule(f"{FIX}/missing.py:compute_score", "f")


@pytest.fixture(scope="module")
def runner():
    r = RuleRunner([f"{FIX}/verl_reward.py:compute_score", "tests.fixtures.user_rewards.trl_rewards:letter_share",
                    f"{FIX}/openrlhf_reward.py:reward_func"], processes=1)
    yield r
    r.close()


def test_each_style_gets_its_frameworks_arguments_and_its_logs_are_kept(runner):
    prompts, responses = ["User: a\nAssistant: ", "User: b\nAssistant: "], ["aaab", "xyz"]
    verl_rows = [{"data_source": "letters", "reward_model": {"ground_truth": g}, "extra_info": {"split": "train"}}
                 for g in "ab"]
    out = runner.run(f"{FIX}/verl_reward.py:compute_score", 10, prompts, responses, verl_rows)
    assert [o.value for o in out] == [0.75, 0.0]
    assert [o.logs for o in out] == [{"has_target": 1.0, "split_is_train": 1.0},
                                     {"has_target": 0.0, "split_is_train": 1.0}]
    # verl's function raising on an unknown data source: unscorable with its reason
    bad = runner.run(f"{FIX}/verl_reward.py:compute_score", 10, prompts[:1], responses[:1],
                     [{**verl_rows[0], "data_source": "other"}])
    assert bad[0].value is None and bad[0].why == "raised (ValueError: unknown data source other)"
    trl_rows = [{"prompt": [{"role": "user", "content": c}], "target": c} for c in "ab"]
    out = runner.run("tests.fixtures.user_rewards.trl_rewards:letter_share", 10, prompts, responses, trl_rows,
                     response_ids=[[5, 5, 5, 6], [7, 8, 9]])
    assert [o.value for o in out] == [0.75, 0.0]
    out = runner.run(f"{FIX}/openrlhf_reward.py:reward_func", 30, prompts, responses, [{"label": c} for c in "ab"])
    assert [o.value for o in out] == [0.75, 0.0] and [o.logs for o in out] == [{"response_chars": 4.0},
                                                                                 {"response_chars": 3.0}]


def test_a_batch_function_returning_the_wrong_number_of_values_makes_the_batch_unscorable():
    runner = RuleRunner(["tests.services.rule_fixtures:trl_one_value"], processes=1)
    try:
        out = runner.run("tests.services.rule_fixtures:trl_one_value", 10, ["p", "q"], ["a", "b"], [{}, {}])
    finally:
        runner.close()
    assert [o.why for o in out] == ["raised (ValueError: returned 1 values for a batch of 2 responses (one value "
                                    "per response expected))"] * 2

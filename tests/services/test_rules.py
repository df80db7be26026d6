"""Rule rewards: built-ins, start-up checks, and failures that are marked, never a silent 0."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlfleet.common.config import RewardConfig, RuleRewardConfig
from rlfleet.common.records import ScoreBatch
from rlfleet.common.tiny_models import build_char_tokenizer
from rlfleet.services.reward_service import RewardService, UnscorableError, drop_unscorable
from rlfleet.services.rules import exact_match, format_check, length_penalty, load_rule, math_answer
from rlfleet.services.sandbox import ProcessWorkers

pytestmark = pytest.mark.unit
FIX = "tests.services.rule_fixtures"


def test_builtin_rules_by_hand():
    assert exact_match("", "thinking...\n#### 42", {"answer": "42"}) == 1.0
    assert exact_match("", "so \\boxed{7} it is", {"answer": " 7 "}) == 1.0
    assert exact_match("", "43", {"answer": "42"}) == 0.0
    assert exact_match("", "42", {}) is None
    assert math_answer("", "the total is 1,000.0", {"answer": "1000"}) == 1.0
    assert math_answer("", "#### 1/2", {"answer": 0.5}) == 1.0
    assert math_answer("", "#### -3", {"answer": "3"}) == 0.0
    assert math_answer("", "no number", {"answer": "3"}) == 0.0
    assert math_answer("", "5", {"answer": "five"}) is None
    assert format_check("", "work\n#### 12", {}) == 1.0
    assert format_check("", "12", {}) == 0.0
    assert format_check("", "12", {"format": r"\d+"}) == 1.0
    assert length_penalty("", "x" * 300, {"target_length": 200}) == pytest.approx(-0.5)
    assert length_penalty("", "x" * 100, {}) == 0.0


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:f", "module 'no_such_module_xyz' does not import (ModuleNotFoundError"),
        (f"{FIX}:missing", "has no function 'missing'"),
        (f"{FIX}:wrong_signature", "wrong_signature(response) fits no reward style. rlfleet accepts a reward function "
                                   "in one of these styles"),
    ],
)
def test_bad_rule_paths_fail_at_startup_naming_the_field(tmp_path, path, message):
    with pytest.raises(ValueError) as info:
        load_rule(path, field="reward.rules[1].function")
    assert f"reward.rules[1].function={path!r}: " in str(info.value)
    assert message in str(info.value)
    tok_dir = tmp_path / "tok"
    build_char_tokenizer().save_pretrained(tok_dir)
    cfg = RewardConfig(rules=[RuleRewardConfig(function="rlfleet.services.rules:exact_match"),
                              RuleRewardConfig(function=path)])
    with pytest.raises(ValueError, match=r"reward\.rules\[1\]\.function="):
        RewardService(cfg, str(tok_dir))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_char_tokenizer().save_pretrained(path)
    return path


def service(tok_dir, *functions, timeout_s: float = 5.0) -> RewardService:
    rules = [RuleRewardConfig(function=f, weight=w, timeout_s=timeout_s) for f, w in functions]
    return RewardService(RewardConfig(rules=rules), str(tok_dir))


def encode(texts):
    tok = build_char_tokenizer()
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def test_weighted_sum_of_rules(tok_dir):
    svc = service(tok_dir, (f"{FIX}:by_length", 0.5), ("rlfleet.services.rules:exact_match", 2.0))
    batch = svc.score(encode(["1+1=", "2+2="]), encode(["2", "five"]), [{"answer": "2"}, {"answer": "4"}])
    assert batch.components == {"rules[0]": [1.0, 4.0], "rules[1]": [1.0, 0.0]}
    assert batch.scores == [0.5 * 1 + 2.0 * 1, 0.5 * 4 + 0.0]
    assert batch.reasons == [None, None]
    svc.close()


def test_the_gold_checker_scores_apart_from_the_training_reward(tok_dir):
    """`data.eval_reward` rules live in the reward service beside its sources but only
    `gold()` uses them: the training score is the proxy's alone."""
    gold = [RuleRewardConfig(function="rlfleet.services.rules:exact_match", weight=2.0),
            RuleRewardConfig(function=f"{FIX}:returns_nan_on_x")]
    svc = RewardService(RewardConfig(rules=[RuleRewardConfig(function=f"{FIX}:by_length")]), str(tok_dir), gold)
    prompts, responses = encode(["1+1=", "2+2=", "3+3="]), encode(["2", "five", "6x"])
    extras = [{"answer": "2"}, {"answer": "4"}, {"answer": "6"}]
    assert svc.score(prompts, responses, extras).scores == [1.0, 4.0, 2.0]
    assert svc.gold(prompts, responses, extras) == [2.0, 0.0, None]  # unscorable by one rule: None
    svc.close()
    plain = service(tok_dir, (f"{FIX}:by_length", 1.0))
    with pytest.raises(ValueError, match="no gold checker"):
        plain.gold(prompts, responses, extras)
    plain.close()
    with pytest.raises(Exception, match=r"data\.eval_reward\[0\]\.function"):
        RewardService(RewardConfig(rules=[RuleRewardConfig(function=f"{FIX}:by_length")]), str(tok_dir),
                      [RuleRewardConfig(function="no_such_module:f")])


@pytest.mark.parametrize(("fn", "reason"), [("raises", "raised (RuntimeError: broken reward code)"),
                                            ("returns_nan", "non_finite (returned nan)")])
def test_raising_or_nan_rule_marks_unscorable(tok_dir, fn, reason):
    svc = service(tok_dir, (f"{FIX}:by_length", 1.0), (f"{FIX}:{fn}", 1.0))
    batch = svc.score(encode(["a", "b"]), encode(["xy", "z"]))
    assert batch.scores == [None, None]  # not 0
    assert batch.reasons == [f"rules[1]:{reason}"] * 2
    assert batch.unscorable_counts == {f"rules[1]:{reason}": 2}
    assert batch.components["rules[0]"] == [2.0, 1.0]  # the other source still reports
    svc.close()


def test_hung_rule_times_out_and_the_service_recovers(tok_dir):
    svc = service(tok_dir, (f"{FIX}:hangs_on_x", 1.0), timeout_s=1.0)
    start = time.monotonic()
    batch = svc.score(encode(["p"] * 4), encode(["ok", "x", "fine", "xx"]))
    assert time.monotonic() - start < 10  # two timeouts, not a hang
    assert batch.scores == [1.0, None, 1.0, None]
    assert batch.reasons == [None, "rules[0]:timeout", None, "rules[0]:timeout"]
    again = svc.score(encode(["p"]), encode(["ok"]))  # hung processes were replaced
    assert again.scores == [1.0]
    svc.close()


def test_a_crashed_rule_process_is_marked_and_replaced(tok_dir):
    svc = service(tok_dir, (f"{FIX}:exits_on_x", 1.0))
    batch = svc.score(encode(["p"] * 3), encode(["ok", "x", "fine"]))
    assert batch.scores == [1.0, None, 1.0]
    assert batch.reasons == [None, "rules[0]:crashed (exit code 3)", None]
    assert svc.score(encode(["p"]), encode(["ok"])).scores == [1.0]
    svc.close()


FIRST_CALL_SCRIPT = """
import sys, time
import torch  # spawned processes re-import this script: seconds of start-up before a call can run
from rlfleet.common.config import RewardConfig, RuleRewardConfig
from rlfleet.common.tiny_models import build_char_tokenizer
from rlfleet.services.reward_service import RewardService

if __name__ == "__main__":
    tok = build_char_tokenizer()
    tok.save_pretrained(sys.argv[1])
    cfg = RewardConfig(rules=[RuleRewardConfig(function="tests.services.rule_fixtures:by_length", timeout_s=0.5)],
                       rule_processes=2)
    svc = RewardService(cfg, sys.argv[1])
    ids = [tok.encode(t, add_special_tokens=False) for t in ("ab", "c", "de", "f")]
    print(svc.score(ids, ids).scores)
    svc.close()
"""


def test_a_rules_first_call_does_not_pay_the_process_start_up(tmp_path):
    """The rule processes start (importing torch with the script) when the service starts, so
    a 0.5 s timeout covers only the call: every response of the first batch is scored."""
    script = tmp_path / "first_call.py"
    script.write_text(FIRST_CALL_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "tok")], capture_output=True, text=True,
                          timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[2.0, 1.0, 2.0, 1.0]"


def test_process_workers_enforce_a_memory_limit_and_survive_it():
    workers = ProcessWorkers([f"{FIX}:allocates_without_bound", f"{FIX}:by_length"], processes=1, memory_mb=1024)
    try:
        (status, detail), = workers.run(f"{FIX}:allocates_without_bound", [()], timeout_s=60)
        assert (status, detail) == ("error", "MemoryError: ") or status == "crashed", (status, detail)
        assert workers.run(f"{FIX}:by_length", [("p", "abc", {})], timeout_s=10) == [("ok", 3.0)]
    finally:
        workers.close()


def test_unscorable_policy_drop_group_and_fail_after_k():
    batch = ScoreBatch([1.0, None, 0.5, 0.2, None, 0.0], {}, [None, "r:timeout", None, None, "r:raised", None])
    groups = [0, 0, 1, 1, 2, 2]
    assert drop_unscorable(batch, groups, "drop_group", 0) == [False, False, True, True, False, False]
    assert drop_unscorable(batch, groups, "fail", 2) == [False, False, True, True, False, False]
    with pytest.raises(UnscorableError, match=r"2 unscorable responses .* exceed reward.max_failures=1"):
        drop_unscorable(batch, groups, "fail", 1)


def test_service_without_any_source_is_refused(tok_dir):
    with pytest.raises(ValueError, match="reward: no reward source"):
        RewardService(RewardConfig(), str(tok_dir))


def test_a_process_that_died_while_idle_is_replaced_before_it_gets_a_call():
    workers = ProcessWorkers([f"{FIX}:by_length"], processes=1)
    try:
        (idle,) = workers._workers
        idle.process.kill()
        idle.process.join(timeout=10)
        assert workers.run(f"{FIX}:by_length", [("p", "ab", {}), ("p", "c", {})], timeout_s=30) == [("ok", 2.0), ("ok", 1.0)]
    finally:
        workers.close()

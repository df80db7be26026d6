"""Model families as users bring them (tests/fixtures/families.py: tiny random models of each
family's real configuration class, with its quirks): the engine's log-probs equal the learner's
before and after a push, responses stop at every EOS id, a chat prompt has one BOS, the saved
checkpoint reloads in transformers and in a new engine, LoRA on the family's default targets
pushes merged weights the engine matches, Qwen3's thinking template honours enable_thinking. The support table in docs/guides/model-families.md states these results."""

from __future__ import annotations

import json

import pytest

from rlfleet.common.config import RunConfig
from rlfleet.rollout.backends import capability_problems
from tests.fixtures.families import BOS_IN_TEMPLATE, FAMILIES, THINKING_FAMILIES, build_family_model
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
    # each step moved the policy far beyond the tolerance (an engine left behind would fail), and
    # it still samples (log-probs near 0 would make every gap small)
    assert r["moved_by_step"] > 20 * TOLERANCE and r["moved_by_lora"] > 20 * TOLERANCE, r
    assert max(r["mean_logprob"]) < -0.5, r
    assert r["bos_in_chat_prompt"] == (1 if family in BOS_IN_TEMPLATE else 0), r
    assert r["ran_past_eos"] == 0 and r["stop_not_at_eos"] == 0, r
    assert len(r["eos_ids"]) >= 2 and set(r["stopped_at"]) == set(r["eos_ids"]), r  # every EOS id ends one
    assert r["reload_max_diff"] == 0.0 and r["reload_engine_gap"] < TOLERANCE, r  # transformers, a new engine
    # LoRA on the family's attention projections (Phi-3: its fused qkv_proj), merged and pushed
    assert r["lora_targets"] == (["o_proj", "qkv_proj"] if family == "phi3" else ["k_proj", "o_proj", "q_proj", "v_proj"])
    assert r["lora_gap"] < TOLERANCE and r["lora_changed_samples"], r
    if family in THINKING_FAMILIES:  # enable_thinking: false opens the answer with an empty think block
        assert r["thinking_off_adds"] == "<think>\n\n</think>\n\n" and r["thinking_off_prompt_in_engine"], r
    else:
        assert "thinking_off_adds" not in r


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


@pytest.mark.unit
def test_lora_targets_auto_are_the_attention_projections_and_a_name_that_matches_nothing_is_refused():
    import torch

    from rlfleet.learner.models import lora_targets

    config_cls, model_cls, _ = FAMILIES["phi3"]
    with torch.device("meta"):
        phi3 = model_cls(config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=2, vocab_size=128, pad_token_id=0))
    assert lora_targets(phi3, "auto") == ["o_proj", "qkv_proj"]
    assert lora_targets(phi3, ["qkv_proj"]) == ["qkv_proj"]
    with pytest.raises(ValueError, match=r"model.lora.target_modules: \['q_proj', 'v_proj'\] match no linear layer "
                                         r"of Phi3ForCausalLM \(its linear layers: \['down_proj', 'gate_up_proj', "
                                         r"'lm_head', 'o_proj', 'qkv_proj'\]\)"):
        lora_targets(phi3, ["q_proj", "v_proj", "o_proj"])

"""The BPE tokenizer fixture (multi-character tokens, role and tool-call tokens, a chat
template with tools) and the environment interface's loader."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfleet.common.bpe import SPECIAL_TOKENS, TOOL_CALL_END, TOOL_CALL_START, build_bpe_tokenizer
from rlfleet.common.config import TinyModelConfig
from rlfleet.common.environment import Environment, EnvironmentLoadError, Step, load_environment
from rlfleet.common.tiny_models import build_tiny_causal_lm

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bpe():
    return build_bpe_tokenizer()


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: digits with + - * between them.
    """
    return expression


def test_bpe_tokens_span_several_characters_and_every_text_round_trips(bpe):
    text = "what is 12*34? the answer is 408"
    ids = bpe.encode(text, add_special_tokens=False)
    pieces = [bpe.decode([i]) for i in ids]
    assert len(ids) < len(text) / 2 and max(len(p) for p in pieces) >= 4
    for sample in (text, "héllo\n\twörld  ", "  leading spaces", "a" * 50, "ab cd\n\nef"):
        assert bpe.decode(bpe.encode(sample, add_special_tokens=False)) == sample
    # Token boundaries depend on context: a turn encoded apart differs from the joined text's
    # encoding, which is what re-tokenizing a whole conversation gets wrong.
    assert any(bpe.encode(a + b, add_special_tokens=False) != bpe.encode(a, add_special_tokens=False)
               + bpe.encode(b, add_special_tokens=False) for a, b in [("12", "34"), ("ans", "wer"), ("gu", "ess")])


def test_role_and_tool_call_tokens_are_one_id_each_even_inside_text(bpe):
    for i, token in enumerate(SPECIAL_TOKENS):
        assert bpe.convert_tokens_to_ids(token) == i
        assert bpe.encode(token, add_special_tokens=False) == [i]
    call = f'{TOOL_CALL_START}{{"name": "calculator"}}{TOOL_CALL_END}'
    ids = bpe.encode(call, add_special_tokens=False)
    assert ids[0] == SPECIAL_TOKENS.index(TOOL_CALL_START) and ids[-1] == SPECIAL_TOKENS.index(TOOL_CALL_END)
    assert bpe.decode(ids) == call


def test_the_chat_template_renders_tools_roles_and_the_generation_prompt(bpe):
    text = bpe.apply_chat_template([{"role": "user", "content": "what is 2+2?"}], tools=[calculator],
                                   tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|system|>Tools: [") and '"name": "calculator"' in text
    assert '"expression": {"type": "string"' in text
    assert text.endswith("<|user|>what is 2+2?<|end|>\n<|assistant|>")
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "4"},
             {"role": "tool", "content": "408"}]
    assert bpe.apply_chat_template(turns, tokenize=False) == \
        "<|user|>hi<|end|>\n<|assistant|>4</s>\n<|tool|>408<|end|>\n"


def test_the_same_seed_trains_the_same_tokenizer(bpe):
    again = build_bpe_tokenizer()
    assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()


def test_a_tiny_model_with_the_bpe_tokenizer_loads_and_scores(tmp_path):
    out = build_tiny_causal_lm(tmp_path / "bpe", seed=0, shape=TinyModelConfig(tokenizer="bpe"))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.vocab_size == len(tok) == 512
    ids = tok.apply_chat_template([{"role": "user", "content": "what is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


class Guess:
    def reset(self, example):
        return [{"role": "user", "content": "guess"}]

    def step(self, response_text):
        return Step(None, reward=1.0, done=True)


class NoStep:
    def reset(self, example):
        return []


class WrongStep:
    def reset(self, example):
        return []

    def step(self):
        return Step(None)


def test_an_environment_is_loaded_by_name_and_checked_with_the_field_named():
    cls = load_environment(f"{__name__}:Guess", "rollout.environment")
    assert isinstance(cls(), Environment) and cls().step("x") == Step(None, 1.0, True)
    for path, message in [("nocolon", "expected 'package.module:Class'"),
                          ("no_such_module_xyz:Env", "cannot import 'no_such_module_xyz'"),
                          (f"{__name__}:Missing", "has no class 'Missing'"),
                          (f"{__name__}:NoStep", r"NoStep has no method step\(\)"),
                          (f"{__name__}:WrongStep", "WrongStep.step must take exactly 1 argument")]:
        with pytest.raises(EnvironmentLoadError, match=rf"rollout.environment=.*{message}"):
            load_environment(path, "rollout.environment")


def test_the_agent_demo_traces_mix_tool_use_and_answers_in_the_head_token_exactly(bpe):
    """`rlfleet demo --agent`'s SFT data: a tool trace is the call, the observation exactly as
    the rollout workers append it (loss mask 0) and the tool's result as the answer; the other
    traces answer at once; the mix is `IN_THE_HEAD`."""
    from rlfleet.common.chat import observation_ids, turn_closing
    from rlfleet.common.tasks import build_task
    from rlfleet.deploy.app.agent_demo import IN_THE_HEAD, calculator_traces
    from rlfleet.services.tools import tool_schema

    rows = build_task("calculator", 0, 400).rows
    traces = calculator_traces(rows, bpe, [tool_schema(calculator)], IN_THE_HEAD, seed=0)
    in_the_head = 0
    for row, t in zip(rows, traces, strict=True):
        text = bpe.decode(t.response_ids)
        if TOOL_CALL_START not in text:
            in_the_head += 1
            assert text == f"the answer is {row['answer']}{bpe.eos_token}" and set(t.loss_mask) == {1}
            continue
        observation = observation_ids(bpe, [{"role": "tool", "content": row["answer"]}], turn_closing(bpe))
        call_end = t.loss_mask.index(0)
        assert t.response_ids[call_end : call_end + len(observation)] == observation
        assert t.loss_mask == [1] * call_end + [0] * len(observation) + [1] * (len(t.response_ids) - call_end - len(observation))
        assert bpe.decode(t.response_ids[call_end + len(observation):]) == f"{row['answer']}{bpe.eos_token}"
    assert abs(in_the_head / len(rows) - IN_THE_HEAD) < 0.08

"""Tools: schemas from type hints and docstrings, the call format, and the sandbox's limits —
every bad call is an error observation, and the tool box keeps working."""

from __future__ import annotations

import time

import pytest

from rlfleet.services.tools import (
    ToolBox,
    ToolCall,
    ToolResult,
    calculator,
    find_tool_call,
    tool_schema,
)

pytestmark = pytest.mark.unit

TOOLS = [f"tests.services.tool_fixtures:{name}" for name in ("add", "sleeps", "hogs", "dies", "raises")]


@pytest.fixture(scope="module")
def box():
    box = ToolBox(TOOLS, timeout_s=2.0, memory_mb=200)
    yield box
    box.close()


def test_a_function_becomes_a_tool_schema():
    schema = tool_schema(calculator)["function"]
    assert schema["name"] == "calculator" and schema["description"].startswith("Evaluate an integer")
    assert schema["parameters"]["required"] == ["expression"]
    assert schema["parameters"]["properties"]["expression"]["type"] == "string"

    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="tool 'undocumented' cannot be offered"):
        tool_schema(undocumented)


def test_the_call_format():
    assert find_tool_call("the answer is 4") is None
    call = find_tool_call('ok <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    assert call == ToolCall("add", {"a": 1, "b": 2})
    for text in ("<tool_call>{not json}</tool_call>", "<tool_call>[1, 2]</tool_call>", "<tool_call>{\"name\": 1"):
        assert find_tool_call(text).error == "unparseable", text
    assert calculator("12*(3+4)") == "84" and calculator("-7//2") == "-4"
    with pytest.raises(ValueError, match="not integer arithmetic"):
        calculator("__import__('os')")


def test_every_bad_call_is_an_error_observation_and_the_box_survives(box):
    assert box.run_turn('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>') == ToolResult("42")
    cases = {
        "<tool_call>nope</tool_call>": "unparseable",
        '<tool_call>{"name": "mul", "arguments": {}}</tool_call>': "unknown_tool",
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>': "bad_arguments",
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}</tool_call>': "bad_arguments",
        '<tool_call>{"name": "raises", "arguments": {}}</tool_call>': "error",
        '<tool_call>{"name": "dies", "arguments": {}}</tool_call>': "crashed",
    }
    for text, kind in cases.items():
        result = box.run_turn(text)
        assert result.error == kind and result.text.startswith("error"), (text, result)
    assert box.call(ToolCall("add", {"a": 1, "b": 1})).text == "2"  # still working


def test_a_hanging_or_hogging_tool_is_cut_by_its_limits(box):
    began = time.monotonic()
    result = box.call(ToolCall("sleeps", {"seconds": 600}))
    assert result.error == "timeout" and "longer than 2 s" in result.text
    assert time.monotonic() - began < 30
    hog = box.call(ToolCall("hogs", {"megabytes": 2000}))
    assert hog.error in ("error", "crashed") and ("MemoryError" in hog.text or "crashed" in hog.text)
    assert box.call(ToolCall("hogs", {"megabytes": 20})).text == str(20 * 2**20)  # within the limit
    assert box.call(ToolCall("add", {"a": 3, "b": 4})).text == "7"


def test_the_built_in_environments_play_whole_episodes(box):
    from rlfleet.common.environment import Environment
    from rlfleet.services.environments import CalculatorTask, GuessNumber
    from rlfleet.services.tools import ToolBox

    game = GuessNumber(high=20, max_guesses=4)
    assert isinstance(game, Environment)
    assert game.reset({"secret": 13}) == [{"role": "user", "content": "guess a number between 1 and 20"}]
    assert game.step("10").observation == [{"role": "user", "content": "higher"}]
    assert game.step("I say 15").observation == [{"role": "user", "content": "lower"}]
    found = game.step("13")
    assert found.done and found.reward == pytest.approx(0.8) and found.info == {"guesses": 3, "success": True}
    game.reset({"secret": 2})
    steps = [game.step("hmm") for _ in range(4)]
    assert steps[0].observation[0]["content"] == "not a number" and steps[-1].done and steps[-1].reward == 0.0

    tools = ToolBox(["rlfleet.services.tools:calculator"], timeout_s=5.0)
    try:
        env = CalculatorTask(tools, max_turns=3)
        env.reset({"question": "what is 12*34?", "answer": 408})
        call = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>')
        assert call.observation == [{"role": "tool", "content": "408"}] and not call.done
        assert call.info["tool_error"] is None
        bad = env.step('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>')
        assert bad.info["tool_error"] == "bad_arguments" and bad.observation[0]["content"].startswith("error")
        final = env.step("the answer is 408")
        assert final.done and final.reward == 1.0
    finally:
        tools.close()

"""Built-in environments (`rlfleet.common.environment` interface): plain classes, one episode
per `reset`.

- `GuessNumber`: find a secret number in 1..`high` from "higher" / "lower" feedback; reward 1
  for finding it, less for every extra guess, 0 when the turns run out.
- `CalculatorTask`: answer an arithmetic question, optionally calling the `calculator` tool
  (`services/tools.py`) first; reward 1 for the right final answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

from rlfleet.common.environment import Message, Step

_FIRST_INT = re.compile(r"-?\d+")


def first_int(text: str) -> int | None:
    found = _FIRST_INT.search(text)
    return int(found.group()) if found else None


class GuessNumber:
    """The secret is `example['secret']` (else drawn from `example['seed']`); at most
    `max_guesses` turns; reward 1 − 0.1 × (guesses − 1) when found (at least 0.1)."""

    def __init__(self, high: int = 20, max_guesses: int = 6):
        self.high, self.max_guesses = high, max_guesses
        self._secret = self._guesses = 0

    def reset(self, example: Mapping[str, Any]) -> list[Message]:
        self._secret = int(example.get("secret") or random.Random(example.get("seed", 0)).randint(1, self.high))
        self._guesses = 0
        return [{"role": "user", "content": f"guess a number between 1 and {self.high}"}]

    def step(self, response_text: str) -> Step:
        self._guesses += 1
        guess = first_int(response_text)
        info = {"guesses": self._guesses}
        if guess == self._secret:
            return Step(None, max(0.1, 1.0 - 0.1 * (self._guesses - 1)), True, {**info, "success": True})
        if self._guesses >= self.max_guesses:
            return Step(None, 0.0, True, {**info, "success": False})
        feedback = "not a number" if guess is None else ("higher" if guess < self._secret else "lower")
        return Step([{"role": "user", "content": feedback}], 0.0, False, info)


class CalculatorTask:
    """`example['question']` and `example['answer']`; a turn with a tool call gets the tool's
    output (or its error) as a `tool` message, a turn without one is the final answer. At most
    `max_turns` turns; `info['tool_error']` names a failed call's kind."""

    def __init__(self, toolbox: Any, max_turns: int = 3):
        self._toolbox, self.max_turns = toolbox, max_turns
        self._answer, self._turns = 0, 0

    def reset(self, example: Mapping[str, Any]) -> list[Message]:
        self._answer, self._turns = int(example["answer"]), 0
        return [{"role": "user", "content": str(example["question"])}]

    def step(self, response_text: str) -> Step:
        self._turns += 1
        result = self._toolbox.run_turn(response_text)
        if result is None:  # a final answer
            right = first_int(response_text) == self._answer
            return Step(None, float(right), True, {"turns": self._turns, "success": right})
        info = {"turns": self._turns, "tool_error": result.error}
        if self._turns >= self.max_turns:
            return Step(None, 0.0, True, {**info, "success": False})
        return Step([{"role": "tool", "content": result.text}], 0.0, False, info)

"""Tools for the tests, imported by name (`tests.services.tool_fixtures:NAME`)."""

from __future__ import annotations

import os
import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


def sleeps(seconds: int) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long.
    """
    time.sleep(seconds)
    return "awake"


def hogs(megabytes: int) -> int:
    """Allocate memory and keep it.

    Args:
        megabytes: how much.
    """
    block = bytearray(megabytes * 2**20)
    return len(block)


def dies() -> str:
    """End its own process."""
    os._exit(3)


def raises() -> str:
    """Raise."""
    raise RuntimeError("tool bug")


class EpisodeProbe:
    """A test environment whose behaviour each example picks (`mode`):

    - `guess`: the number game (`GuessNumber`), multi-turn whatever the model says;
    - `calls`: ignores the model's text and makes the tool calls listed in `calls`, one per
      turn, through the run's tools (bad ones included); done after the last;
    - `dies`: the number game, but the second step of the first such episode SIGKILLs the
      host's process (once per `marker` file), as a crashed environment would.
    """

    def __init__(self, toolbox=None):
        from rlfleet.services.environments import GuessNumber

        self._toolbox, self._game = toolbox, GuessNumber(high=20, max_guesses=3)
        self._example: dict = {}
        self._turn = 0

    def reset(self, example):
        self._example, self._turn = dict(example), 0
        return self._game.reset(example)

    def step(self, response_text):
        from rlfleet.common.environment import Step

        self._turn += 1
        mode = self._example.get("mode", "guess")
        if mode == "dies" and self._turn == 2 and not os.path.exists(self._example["marker"]):
            open(self._example["marker"], "w").close()  # noqa: SIM115 - a marker file, closed at once
            os.kill(os.getpid(), 9)
        if mode != "calls":
            return self._game.step(response_text)
        calls = self._example["calls"]
        result = self._toolbox.run_turn(calls[self._turn - 1])
        done = self._turn >= len(calls)
        return Step(None if done else [{"role": "tool", "content": result.text}], 0.0, done,
                    {"tool_error": result.error, "success": done})

"""Built-in prompt tasks generated from a seed, each with the rule that checks it.

They need no files, so the demo and the tests run anywhere:
- `addition`: "User: 12+7=" → the sum; checked by `math_answer` against `answer`.
- `char_fraction`: asks for a target character; the reward is the fraction of the response
  made of it (`char_fraction`), a task a tiny model learns in a few dozen steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    """Rows of a built-in task and the reward rule (`module:function`) that scores them."""

    rows: list[dict[str, Any]]
    rule: str


def _addition(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)})
    return rows


_PHRASES = ("say", "write", "print", "give me", "repeat", "type", "show", "emit")


def _char_fraction(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        phrase = rng.choice(_PHRASES)
        rows.append({"prompt": [{"role": "user", "content": f"{phrase} a {rng.randint(0, 99)}"}], "target": "a"})
    return rows


_TASKS = {
    "addition": (_addition, "rlfleet.services.rules:math_answer"),
    "char_fraction": (_char_fraction, "rlfleet.services.rules:char_fraction"),
}
TASK_NAMES = tuple(_TASKS)


def build_task(name: str, seed: int, size: int) -> Task:
    """`size` rows of task `name`, the same for the same seed."""
    if name not in _TASKS:
        raise ValueError(f"unknown data.task {name!r}; built-in tasks: {', '.join(TASK_NAMES)}")
    make, rule = _TASKS[name]
    return Task(make(random.Random(f"{name}:{seed}"), size), rule)

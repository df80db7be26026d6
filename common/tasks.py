"""Built-in prompt tasks generated from a seed, each with the rule that checks it.

They need no files, so the demo and the tests run anywhere:
- `addition`: "User: 12+7=" → the sum; checked by `math_answer` against `answer`.
- `char_fraction`: asks for a target character; the reward is the fraction of the response
  made of it (`char_fraction`), a task a tiny model learns in a few dozen steps.
- `reverse`: "reverse: cab" → "bac" over 3 letters of a–j, checked by `exact_match`. Its 1000
  strings are split once (a fixed seed) into 900 train and 100 test strings, so held-out
  accuracy measures the skill, not memory.
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


_LETTERS = "abcdefghij"
_REVERSE_TEST = 100


def _reverse_split(split: str) -> list[str]:
    words = [a + b + c for a in _LETTERS for b in _LETTERS for c in _LETTERS]
    random.Random("reverse-split").shuffle(words)  # fixed: the split never depends on the run seed
    return words[:_REVERSE_TEST] if split == "test" else words[_REVERSE_TEST:]


def _reverse(rng: random.Random, n: int, split: str = "train") -> list[dict[str, Any]]:
    words = _reverse_split(split)
    order = [w for _ in range(-(-n // len(words))) for w in rng.sample(words, len(words))][:n]
    return [{"prompt": [{"role": "user", "content": f"reverse: {w}"}], "answer": w[::-1]} for w in order]


_TASKS = {
    "addition": (_addition, "rlfleet.services.rules:math_answer"),
    "char_fraction": (_char_fraction, "rlfleet.services.rules:char_fraction"),
    "reverse": (_reverse, "rlfleet.services.rules:exact_match"),
}
TASK_NAMES = tuple(_TASKS)


def build_task(name: str, seed: int, size: int, split: str = "train") -> Task:
    """`size` rows of task `name`, the same for the same seed. `split='test'` gives held-out
    rows (for tasks with a fixed split; the others draw from another seed)."""
    if name not in _TASKS:
        raise ValueError(f"unknown data.task {name!r}; built-in tasks: {', '.join(TASK_NAMES)}")
    make, rule = _TASKS[name]
    if name == "reverse":
        return Task(make(random.Random(f"{name}:{seed}"), size, split), rule)
    key = f"{name}:{seed}" if split == "train" else f"{name}:{seed}:{split}"
    return Task(make(random.Random(key), size), rule)


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same length and alphabet: every character redrawn (never the answer)."""
    alphabet = _LETTERS if answer.isalpha() else "0123456789"
    while True:
        wrong = "".join(rng.choice(alphabet) for _ in answer)
        if wrong != answer:
            return wrong

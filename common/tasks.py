"""Built-in prompt tasks generated from a seed, each with the rule that checks it.

They need no files, so the demo and the tests run anywhere:
- `addition`: "User: 12+7=" → the sum; checked by `math_answer` against `answer`.
- `char_fraction`: asks for a target character; the reward is the fraction of the response
  made of it (`char_fraction`), a task a tiny model learns in a few dozen steps.
- `calculator`: 'what is "47*86"?' (two 2-digit factors), for the `calculator` environment and
  its tool; `guess_number`: a secret in 1..20, for the `guess_number` environment.
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


def _calculator(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f'what is "{a}*{b}"?'
        rows.append({"prompt": [{"role": "user", "content": question}], "question": question, "answer": str(a * b)})
    return rows


def _guess_number(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        secret = rng.randint(1, 20)
        rows.append({"prompt": [{"role": "user", "content": "guess a number between 1 and 20"}], "secret": secret,
                     "answer": str(secret)})
    return rows


_TASKS = {
    "addition": (_addition, "rlfleet.services.rules:math_answer"),
    "calculator": (_calculator, "rlfleet.services.rules:math_answer"),
    "guess_number": (_guess_number, "rlfleet.services.rules:math_answer"),
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


NEGATIVE_KINDS = ("swap", "one_wrong", "shuffle", "length", "random")
"""Kinds of wrong answer for preference data, hardest first: two characters swapped, one
character wrong, the right characters in another order, one character dropped or added, and
every character redrawn (the easy kind)."""


def wrong_answer(answer: str, rng: random.Random, kind: str = "random") -> str:
    """A wrong answer of `kind` (see NEGATIVE_KINDS), never equal to `answer`. A kind that
    cannot change this answer (a swap in "aaa") falls back to one wrong character."""
    alphabet = _LETTERS if answer.isalpha() else "0123456789"
    chars = list(answer)
    if kind == "swap":
        pairs = [(i, j) for i in range(len(chars)) for j in range(i + 1, len(chars)) if chars[i] != chars[j]]
        if pairs:
            i, j = rng.choice(pairs)
            chars[i], chars[j] = chars[j], chars[i]
            return "".join(chars)
        kind = "one_wrong"
    if kind == "shuffle":
        orders = sorted({"".join(p) for p in _permutations(chars)} - {answer})
        if orders:
            return rng.choice(orders)
        kind = "one_wrong"
    if kind == "one_wrong":
        i = rng.randrange(len(chars))
        chars[i] = rng.choice([c for c in alphabet if c != chars[i]])
        return "".join(chars)
    if kind == "length":
        i = rng.randrange(len(chars) + 1)
        if len(chars) > 1 and rng.random() < 0.5:
            del chars[min(i, len(chars) - 1)]
        else:
            chars.insert(i, rng.choice(alphabet))
        return "".join(chars)
    if kind != "random":
        raise ValueError(f"unknown kind of wrong answer {kind!r}; kinds: {', '.join(NEGATIVE_KINDS)}")
    while True:
        wrong = "".join(rng.choice(alphabet) for _ in answer)
        if wrong != answer:
            return wrong


def _permutations(chars: list[str]) -> list[tuple[str, ...]]:
    from itertools import permutations

    return list(permutations(chars)) if len(chars) <= 6 else [tuple(random.Random(0).sample(chars, len(chars)))]

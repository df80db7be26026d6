"""Answer-equivalence accuracy of the math rules (`rlfleet.services.rules:math_verify` and the
older `math_answer`) on tests/fixtures/answer_equivalence.jsonl: 204 labelled (reference,
response) pairs written for rlfleet, GSM8K-style ('#### 1,000') and MATH-style (boxed LaTeX:
fractions, roots, sets, intervals, tuples, units, percentages, degrees, equations), half of them
equal, half not. A rule is right on a pair when it scores 1.0 exactly on the equal ones (None
counts as wrong).

    python bench/answer_equivalence.py [--misses]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlfleet.services import rules

PAIRS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "answer_equivalence.jsonl"


def accuracy(rule, pairs: list[dict]) -> tuple[float, list[dict]]:
    misses = []
    for p in pairs:
        score = rule("", p["response"], {"answer": p["reference"]})
        if (score == 1.0) != p["equal"]:
            misses.append({**p, "score": score})
    return 1 - len(misses) / len(pairs), misses


def main(argv: list[str]) -> dict[str, float]:
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    out = {}
    for name in ("math_verify", "math_answer"):
        acc, misses = accuracy(getattr(rules, name), pairs)
        out[name] = acc
        by_kind = {k: 1 - sum(m["kind"] == k for m in misses) / sum(p["kind"] == k for p in pairs)
                   for k in ("gsm8k", "math")}
        print(f"{name}: {acc:.1%} of {len(pairs)} pairs (gsm8k {by_kind['gsm8k']:.1%}, math {by_kind['math']:.1%})")  # noqa: T201
        if "--misses" in argv:
            for m in misses:
                print(f"    {m['reference']!r} vs {m['response']!r}: equal={m['equal']} score={m['score']}")  # noqa: T201
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

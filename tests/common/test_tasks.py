"""The wrong answers preference data is built from: each kind is the near miss it says."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from rlfleet.common.tasks import NEGATIVE_KINDS, build_task, wrong_answer

pytestmark = pytest.mark.unit


def test_each_kind_of_wrong_answer_is_the_near_miss_it_names():
    rng = random.Random(0)
    answers = [r["answer"] for r in build_task("reverse", 0, 300).rows] + ["aab", "aaa", "17", "5"]
    for answer in answers:
        made = {kind: wrong_answer(answer, rng, kind) for kind in NEGATIVE_KINDS}
        assert all(w != answer for w in made.values()), (answer, made)
        differing = sum(a != b for a, b in zip(made["one_wrong"], answer, strict=True))
        assert differing == 1
        if len(set(answer)) > 1:  # otherwise a swap or a reordering cannot change it
            assert Counter(made["swap"]) == Counter(answer)
            assert sum(a != b for a, b in zip(made["swap"], answer, strict=True)) == 2
            assert Counter(made["shuffle"]) == Counter(answer)
        assert abs(len(made["length"]) - len(answer)) == 1
        assert len(made["random"]) == len(answer) and set(made["random"]) <= set("abcdefghij0123456789")
    with pytest.raises(ValueError, match="unknown kind of wrong answer 'typo'; kinds: swap"):
        wrong_answer("abc", rng, "typo")


def test_every_row_gives_one_pair_per_kind(tmp_path):
    from rlfleet.common.config import RunConfig
    from rlfleet.deploy.app.stages import _rows

    cfg = RunConfig.model_validate({"data": {"task": "reverse", "task_size": 50},
                                    "rm": {"eval_size": 10, "negatives": ["swap", "random"]}})
    train, test = _rows(cfg, "rm", cfg.rm)
    assert [row["kind"] for _, row in train[:4]] == ["swap", "random", "swap", "random"] and len(train) == 100
    assert len(test) == 20 and Counter(row["kind"] for _, row in test) == {"swap": 10, "random": 10}
    assert all(row["rejected"] != row["chosen"] for _, row in train + test)

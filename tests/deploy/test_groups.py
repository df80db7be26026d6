"""Dynamic sampling's bookkeeping (no Ray): merging a step's batches and choosing its groups."""

from __future__ import annotations

import pytest

from rlfleet.common.data import Example
from rlfleet.common.records import Prepared, Rollout, ScoreBatch
from rlfleet.deploy.groups import ScoredBatch, choose_groups, informative_groups, merge

pytestmark = pytest.mark.unit


def batch(scores_per_group: list[list[float]], tag: int) -> ScoredBatch:
    rollouts, scores = [], []
    for g, group in enumerate(scores_per_group):
        for s in group:
            rollouts.append(Rollout(g, [tag, g], [tag, g, len(rollouts)], [-1.0] * 3, "stop", 0))
            scores.append(s)
    n = len(rollouts)
    examples = [Example([tag, g], {"tag": tag, "group": g}) for g in range(len(scores_per_group))]
    return ScoredBatch(examples, rollouts, ScoreBatch(scores, {"rules[0]": list(scores)}, [None] * n, [], {"n": tag}),
                       Prepared([[float(i)] * 3 for i in range(n)], None, None), [[0.5] * 3] * n, 1.0, 3 * n, 0)


def test_merge_shifts_groups_and_choose_keeps_informative_ones_first():
    first = batch([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5]], tag=1)  # group 1 informative
    second = batch([[0.2, 0.7], [0.3, 0.3]], tag=2)  # group 0 (→ 3) informative
    both = merge(first, second)
    assert [r.prompt_index for r in both.rollouts] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [e.extra["tag"] for e in both.examples] == [1, 1, 1, 2, 2]
    assert both.scored.state == {"n": 2} and len(both.prepared.old_logprobs) == 10 and both.generate_seconds == 2.0
    assert informative_groups(both.scored.scores, [r.prompt_index for r in both.rollouts]) == [1, 3]
    chosen, left_out = choose_groups(both, 3)
    assert [r.prompt_index for r in chosen.rollouts] == [0, 0, 1, 1, 3, 3] and left_out == 2
    assert chosen.scored.scores == [1.0, 1.0, 0.0, 1.0, 0.2, 0.7]
    assert chosen.scored.components["rules[0]"] == chosen.scored.scores
    assert chosen.prepared.old_logprobs[3] == [3.0] * 3 and chosen.prepared.old_logprobs[4] == [0.0] * 3  # 2nd batch, row 0
    assert len(chosen.ref) == 6
    # an unscorable response (None) neither makes nor breaks a group's spread
    assert informative_groups([None, 1.0, 1.0, None, 0.0, 1.0], [0, 0, 0, 1, 1, 1]) == [1]

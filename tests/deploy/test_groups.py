"""Dynamic sampling's bookkeeping (no Ray): merging a step's batches and choosing its groups."""

from __future__ import annotations

import pytest

from rlfleet.common.data import Example
from rlfleet.common.records import Held, Rollout, ScoreBatch
from rlfleet.deploy.loop.groups import ScoredBatch, choose_groups, informative_groups, merge

pytestmark = pytest.mark.unit


def batch(scores_per_group: list[list[float]], tag: int) -> ScoredBatch:
    rollouts, scores = [], []
    for g, group in enumerate(scores_per_group):
        for s in group:
            rollouts.append(Rollout(g, [tag, g], [tag, g, len(rollouts)], [-1.0] * 3, "stop", 0))
            scores.append(s)
    n = len(rollouts)
    examples = [Example([tag, g], {"tag": tag, "group": g}) for g in range(len(scores_per_group))]
    # the rows "in the object store": an object per batch, which `fetch` finds in its cache
    STORE[f"old{tag}"] = [[float(i)] * 3 for i in range(n)]
    STORE[f"ref{tag}"] = [[0.5] * 3] * n
    return ScoredBatch(examples, rollouts, ScoreBatch(scores, {"rules[0]": list(scores)}, [None] * n, {"rules[0]": 1.0}),
                       Held.of([(list(range(n)), f"old{tag}")]), None, Held.of([(list(range(n)), f"ref{tag}")]),
                       1.0, 3 * n, 0)


STORE: dict[str, list] = {}


def NO_RAY(refs):  # noqa: N802 - every object is in the cache
    raise AssertionError(f"fetched {refs} outside the cache")


def test_merge_shifts_groups_and_choose_keeps_informative_ones_first():
    first = batch([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5]], tag=1)  # group 1 informative
    second = batch([[0.2, 0.7], [0.3, 0.3]], tag=2)  # group 0 (→ 3) informative
    both = merge(first, second)
    assert [r.prompt_index for r in both.rollouts] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [e.extra["tag"] for e in both.examples] == [1, 1, 1, 2, 2]
    assert len(both.old_logprobs.fetch(NO_RAY, STORE)) == 10 and both.values is None and both.generate_seconds == 2.0
    assert informative_groups(both.scored.scores, [r.prompt_index for r in both.rollouts]) == [1, 3]
    chosen, left_out = choose_groups(both, 3)
    assert [r.prompt_index for r in chosen.rollouts] == [0, 0, 1, 1, 3, 3] and left_out == 2
    assert chosen.scored.scores == [1.0, 1.0, 0.0, 1.0, 0.2, 0.7]
    assert chosen.scored.components["rules[0]"] == chosen.scored.scores
    old = chosen.old_logprobs.fetch(NO_RAY, STORE)
    assert old[3] == [3.0] * 3 and old[4] == [0.0] * 3 and len(old) == 6  # old[4]: the 2nd batch's row 0
    assert chosen.ref.fetch(NO_RAY, STORE) == [[0.5] * 3] * 6
    # an unscorable response (None) neither makes nor breaks a group's spread
    assert informative_groups([None, 1.0, 1.0, None, 0.0, 1.0], [0, 0, 0, 1, 1, 1]) == [1]


def test_held_rows_follow_shards_selections_and_merges_in_order():
    """Rows left in the object store by two learner ranks (balanced shards, not contiguous)
    come back in the batch's order; a selection and a merge only renumber rows."""
    from rlfleet.common.records import Prepared

    store = {"rank0": Prepared([[0.0], [3.0], [4.0]], None), "rank1": Prepared([[1.0], [2.0]], None),
             "other": [[10.0], [11.0]]}
    old = Held.of([([0, 3, 4], "rank0"), ([1, 2], "rank1")], "old_logprobs")
    assert old.rows == (0, 1, 2, 3, 4) and old.fetch(NO_RAY, store) == [[0.0], [1.0], [2.0], [3.0], [4.0]]
    assert Held.of([([0, 3, 4], "rank0"), ([1, 2], "rank1")], "values").fetch(NO_RAY, store) is None  # no critic
    picked = old.take([4, 1, 2])
    assert picked.fetch(NO_RAY, store) == [[4.0], [1.0], [2.0]]
    merged = picked.then(Held.of([([0, 1], "other")]).take([1]))
    assert merged.rows == (4, 1, 2, 6) and merged.fetch(NO_RAY, store) == [[4.0], [1.0], [2.0], [11.0]]

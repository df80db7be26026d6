"""A group of D learner actors (gloo, DDP) updates exactly like one learner on the whole batch."""

from __future__ import annotations

import pytest
import ray
import torch

from rlfleet.common.collate import balanced_shards
from rlfleet.deploy.learner_group import LearnerGroup
from rlfleet.learner.learner import Learner
from tests.learner.test_learner import experience, make_config, make_rollouts

# lr 1e-4: D = 1 and D = 2 differ only in the order of float sums; Adam's first step turns a
# rounding-level difference in a near-zero gradient into up to lr, so lr bounds what can differ.
LR = 1e-4


@pytest.mark.unit
def test_balanced_shards_split_by_length():
    lengths = [10, 1, 7, 3, 3, 6]
    shards = balanced_shards(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(6))
    assert shards == [[0, 3, 4], [1, 2, 5]]  # longest first, each to the lighter shard: 16 vs 14
    many = list(range(1, 40))
    loads = [sum(many[i] for i in s) for s in balanced_shards(many, 3)]
    assert max(loads) - min(loads) <= 39  # greedy's bound: the largest item
    assert balanced_shards(lengths, 2) == shards and balanced_shards([5], 3) == [[0], [], []]


def group_config(estimator: str, workers: int):
    return make_config(estimator, lr=LR, critic_lr=LR, num_workers=workers, minibatch_size=3)


@pytest.fixture(scope="module")
def step_batches(tiny_model_dir):
    """Two steps of experience prepared by a plain learner (the same input for every D)."""
    out = {}
    for estimator in ("gae", "grpo"):
        learner = Learner(group_config(estimator, 1), str(tiny_model_dir))
        first = experience(learner, make_rollouts(seed=0))
        learner.train_step(first)
        out[estimator] = (first, experience(learner, make_rollouts(seed=5, version=1)))
    return out


def snapshots(group: LearnerGroup) -> list[dict[str, torch.Tensor]]:
    return ray.get([h.parameter_snapshot.remote() for h in group.handles])


@pytest.mark.ray
@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_two_ranks_update_like_one_and_checkpoints_cross_d(ray_cluster, tiny_model_dir, tmp_path, step_batches, estimator):
    first, second = step_batches[estimator]
    groups = {d: LearnerGroup.start(group_config(estimator, d), str(tiny_model_dir)) for d in (1, 2)}
    try:
        results = {d: g.train_step(first) for d, g in groups.items()}
        (one,), (rank0, rank1) = snapshots(groups[1]), snapshots(groups[2])
        assert any(k.startswith("critic.") for k in one) == (estimator == "gae")
        for name in one:
            assert torch.equal(rank0[name], rank1[name]), name  # the replicas stay identical
            torch.testing.assert_close(rank0[name], one[name], atol=1e-5, rtol=0, msg=name)
        for key, value in results[1].metrics.items():
            if value is not None:
                assert results[2].metrics[key] == pytest.approx(value, abs=1e-5), key
        # A checkpoint written by the D = 2 group resumes in a D = 1 group and the other way
        # round; the next step then agrees again.
        groups[2].save(str(tmp_path / "from2"))
        groups[1].save(str(tmp_path / "from1"))
        assert groups[1].load(str(tmp_path / "from2")) == groups[2].load(str(tmp_path / "from1")) == 1
        for g in groups.values():
            g.train_step(second)
        (one,), (rank0, rank1) = snapshots(groups[1]), snapshots(groups[2])
        for name in one:
            assert torch.equal(rank0[name], rank1[name]), name
            torch.testing.assert_close(rank0[name], one[name], atol=1e-5, rtol=0, msg=name)
    finally:
        for g in groups.values():
            g.kill()


@pytest.mark.ray
def test_group_prepare_gathers_shards_in_order(ray_cluster, tiny_model_dir):
    rollouts = make_rollouts()
    plain = Learner(group_config("gae", 1), str(tiny_model_dir)).prepare(rollouts)
    group = LearnerGroup.start(group_config("gae", 2), str(tiny_model_dir))
    try:
        got = group.prepare(rollouts)
    finally:
        group.kill()
    for a, b in zip(plain.old_logprobs + plain.values, got.old_logprobs + got.values, strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=0)

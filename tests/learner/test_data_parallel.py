"""A group of D learner actors (gloo; DDP or FSDP2) updates exactly like one learner on the whole batch."""

from __future__ import annotations

import pytest
import ray
import torch

from rlfleet.common.collate import balanced_shards
from rlfleet.common.config import ClusterConfig
from rlfleet.common.weights import iter_state_dict
from rlfleet.deploy.learner_group import LearnerGroup
from rlfleet.learner.learner import Learner
from tests.learner.test_learner import (
    experience,
    make_config,
    make_rollouts,
    single_update_batch,
    single_update_config,
)

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


def group_config(estimator: str, workers: int, strategy: str = "ddp", lora: bool = False):
    # A 24-token budget gives the ranks' shares different numbers of micro-batches, which
    # sharded ranks must even out with idle passes.
    return make_config(estimator, lora=lora, lr=LR, critic_lr=LR, num_workers=workers, minibatch_size=3,
                       strategy=strategy, micro_batch_tokens=24)


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


def published(group: LearnerGroup) -> dict[str, torch.Tensor]:
    return dict(iter_state_dict(ray.get(list(group.publish_refs()))))


CASES = [("gae", "ddp", False), ("grpo", "ddp", False), ("gae", "fsdp", False), ("grpo", "fsdp", True)]


@pytest.mark.ray
@pytest.mark.parametrize(("estimator", "strategy", "lora"), CASES)
def test_two_ranks_update_like_one_and_checkpoints_cross_d(ray_cluster, tiny_model_dir, tmp_path, step_batches,
                                                           estimator, strategy, lora):
    configs = {d: group_config(estimator, d, strategy, lora) for d in (1, 2)}
    check_two_ranks_like_one(configs, str(tiny_model_dir), tmp_path, *step_batches[estimator])


@pytest.mark.ray
@pytest.mark.gpu
@pytest.mark.parametrize(("estimator", "lora"), [("gae", False), ("grpo", True)])
def test_fsdp_over_nccl_updates_like_one_gpu(ray_cluster, tiny_model_dir, tmp_path, step_batches, estimator, lora):
    """The GPU path: FSDP2 shards on two GPUs, NCCL collectives, fp32 (TF32 is off by default)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("two ranks over NCCL need two GPUs (NCCL refuses two ranks on one device)")
    configs = {d: group_config(estimator, d, "fsdp", lora).model_copy(update={"cluster": GPU_CLUSTER})
               for d in (1, 2)}
    check_two_ranks_like_one(configs, str(tiny_model_dir), tmp_path, *step_batches[estimator])


GPU_CLUSTER = ClusterConfig.model_validate({"learner": {"num_cpus": 1, "num_gpus": 1}})


def check_two_ranks_like_one(configs, model: str, tmp_path, first, second) -> None:
    """D = 2 and D = 1 groups: equal updates, metrics and published weights; checkpoints cross D."""
    groups = {d: LearnerGroup.start(cfg, model) for d, cfg in configs.items()}
    lora = configs[1].model.lora.enabled
    try:
        if configs[2].learner.strategy == "fsdp":  # each rank holds about half of every model
            (whole,), halves = (ray.get([h.local_numel.remote() for h in g.handles]) for g in groups.values())
            assert sum(halves) == whole and max(halves) <= 0.55 * whole
        results = {d: g.train_step(first) for d, g in groups.items()}
        (one,), (rank0, rank1) = snapshots(groups[1]), snapshots(groups[2])
        assert any(k.startswith("critic.") for k in one) == (configs[1].algorithm.advantage_estimator == "gae")
        assert all("lora_" in k for k in one if k.startswith("policy.")) == lora
        for name in one:
            assert torch.equal(rank0[name], rank1[name]), name  # the replicas stay identical
            torch.testing.assert_close(rank0[name], one[name], atol=1e-5, rtol=0, msg=name)
        for key, value in results[1].metrics.items():
            if value is not None:
                assert results[2].metrics[key] == pytest.approx(value, abs=1e-5), key
        # What rank 0 publishes (gathered from the shards under FSDP, LoRA merged) is D = 1's.
        pub1, pub2 = published(groups[1]), published(groups[2])
        assert pub1.keys() == pub2.keys() and not any("lora" in k for k in pub1)
        for name in pub1:
            torch.testing.assert_close(pub2[name], pub1[name], atol=1e-5, rtol=0, msg=name)
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
def test_sharded_ranks_make_their_own_old_logprobs_like_one_learner(ray_cluster, tiny_model_dir):
    """One update per batch on 2 FSDP2 ranks without `prepare`: each rank fills the old
    log-probs of its share, summed over the ranks for the metrics; the update and metrics are
    those of one learner given them by `prepare`."""
    plain = Learner(single_update_config(lr=LR, micro_batch_tokens=24), str(tiny_model_dir))
    prepared, own = single_update_batch(plain, make_rollouts())
    want = plain.train_step(prepared).metrics
    cfg = single_update_config(lr=LR, micro_batch_tokens=24, num_workers=2, strategy="fsdp")
    group = LearnerGroup.start(cfg, str(tiny_model_dir))
    try:
        got = group.train_step(own).metrics
        rank0, rank1 = snapshots(group)
    finally:
        group.kill()
    one = plain.parameter_snapshot()
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], one[name], atol=1e-5, rtol=0, msg=name)
    assert got["objective/kl"] > 1e-3
    for key, value in want.items():
        if value is not None:
            assert got[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.ray
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_group_prepare_gathers_shards_in_order(ray_cluster, tiny_model_dir, strategy):
    rollouts = make_rollouts()
    plain = Learner(group_config("gae", 1), str(tiny_model_dir))
    group = LearnerGroup.start(group_config("gae", 2, strategy), str(tiny_model_dir))
    try:
        # All six (two micro-batches on one rank, one on the other), then one (a rank idle).
        for part in (rollouts, rollouts[:1]):
            want, got = plain.prepare(part), group.prepare(part)
            for a, b in zip(want.old_logprobs + want.values + want.ref_logprobs,
                            got.old_logprobs + got.values + got.ref_logprobs, strict=True):
                torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=0)
    finally:
        group.kill()

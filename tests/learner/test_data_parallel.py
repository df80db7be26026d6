"""A group of D learner actors (gloo; DDP or FSDP2) updates exactly like one learner on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from rlfleet.common.collate import balanced_shards
from rlfleet.common.config import ClusterConfig
from rlfleet.deploy.actors.learner_group import LearnerGroup
from rlfleet.learner.learner import Learner
from rlfleet.weight_sync.object_store import OBJECT_STORE, iter_state_dict
from tests.learner.test_learner import (
    experience,
    make_config,
    make_rollouts,
    record_gradients,
    recorded_gradients,
    single_update_batch,
    single_update_config,
    start_recording_gradients,
)

# D = 1 and D = 2 differ only in the order of float sums, so their gradients agree to rounding
# (compared at GRAD_TOL). Their weights after an AdamW step need not: Adam turns a
# rounding-level difference in a near-zero gradient into up to lr, so an element may differ
# by up to 2·lr per step (ADAM_BOUND); lr 1e-4 keeps that small.
LR = 1e-4
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-5}


def adam_bound(steps: int) -> dict[str, float]:
    """What AdamW's steps can turn rounding-level gradient differences into, elementwise."""
    return {"atol": 2 * LR * steps + 1e-7, "rtol": 0}


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


def record(group: LearnerGroup) -> None:
    ray.get([h.__ray_call__.remote(start_recording_gradients) for h in group.handles])


def gradients(group: LearnerGroup) -> list[list[dict[str, torch.Tensor]]]:
    """Per rank, the gradients of every optimizer step since `record`."""
    return ray.get([h.__ray_call__.remote(recorded_gradients) for h in group.handles])


def assert_same_tensors(a: Path, b: Path) -> None:
    """Every safetensors file of checkpoint folder `a` holds exactly the tensors of `b`'s."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for rel in files:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys(), rel
        for name in x:
            assert torch.equal(x[name], y[name]), f"{rel}:{name}"


def check_gradients(want: list[dict[str, torch.Tensor]], got: list[dict[str, torch.Tensor]]) -> None:
    assert len(want) == len(got) >= 1
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], **GRAD_TOL, msg=name)


def published(group: LearnerGroup) -> dict[str, torch.Tensor]:
    return dict(iter_state_dict(ray.get(list(OBJECT_STORE.source(0, group, 1).chunks))))


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
    """D = 2 and D = 1 groups: equal gradients and metrics, replicas that stay identical,
    published weights gathered whole; checkpoints cross D."""
    groups = {d: LearnerGroup.start(cfg, model) for d, cfg in configs.items()}
    lora = configs[1].model.lora.enabled
    try:
        if configs[2].learner.strategy == "fsdp":  # each rank holds about half of every model
            (whole,), halves = (ray.get([h.local_numel.remote() for h in g.handles]) for g in groups.values())
            assert sum(halves) == whole and max(halves) <= 0.55 * whole
        for g in groups.values():
            record(g)
        results = {d: g.train_step(first) for d, g in groups.items()}
        (grads1,), (grads2, _) = gradients(groups[1]), gradients(groups[2])
        check_gradients(grads1, grads2)
        (one,), (rank0, rank1) = snapshots(groups[1]), snapshots(groups[2])
        assert any(k.startswith("critic.") for k in one) == (configs[1].algorithm.advantage_estimator == "gae")
        assert all("lora_" in k for k in one if k.startswith("policy.")) == lora
        for name in one:
            assert torch.equal(rank0[name], rank1[name]), name  # the replicas stay identical
            torch.testing.assert_close(rank0[name], one[name], **adam_bound(1), msg=name)
        for key, value in results[1].metrics.items():
            if value is not None:
                assert results[2].metrics[key] == pytest.approx(value, abs=1e-5), key
        # What rank 0 publishes (gathered from the shards under FSDP, LoRA merged) is D = 1's.
        pub1, pub2 = published(groups[1]), published(groups[2])
        assert pub1.keys() == pub2.keys() and not any("lora" in k for k in pub1)
        for name in pub1:
            torch.testing.assert_close(pub2[name], pub1[name], **adam_bound(1), msg=name)
        if not lora:  # the whole weights, gathered exactly
            for name, value in pub2.items():
                assert torch.equal(value, rank0[f"policy.{name}"]), name
        # A checkpoint written by the D = 2 group loads into a D = 1 group and the other way
        # round, exactly: saved again, it is the same file.
        folders = {name: str(tmp_path / name) for name in ("from1", "from2", "back1", "back2")}
        groups[2].save(folders["from2"])
        groups[1].save(folders["from1"])
        assert groups[1].load(folders["from2"]) == groups[2].load(folders["from1"]) == 1
        groups[1].save(folders["back2"])
        groups[2].save(folders["back1"])
        for saved, again in (("from1", "back1"), ("from2", "back2")):
            assert_same_tensors(tmp_path / saved, tmp_path / again)
        # From one state (D = 1's), the next step agrees again.
        assert groups[1].load(folders["from1"]) == 1
        for g in groups.values():
            g.train_step(second)
        (grads1,), (grads2, _) = gradients(groups[1]), gradients(groups[2])
        half = len(grads1) // 2
        check_gradients(grads1[half:], grads2[half:])
        (one,), (rank0, rank1) = snapshots(groups[1]), snapshots(groups[2])
        for name in one:
            assert torch.equal(rank0[name], rank1[name]), name
            torch.testing.assert_close(rank0[name], one[name], **adam_bound(1), msg=name)
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
    want_grads = record_gradients(plain)
    want = plain.train_step(prepared).metrics
    cfg = single_update_config(lr=LR, micro_batch_tokens=24, num_workers=2, strategy="fsdp")
    group = LearnerGroup.start(cfg, str(tiny_model_dir))
    try:
        record(group)
        got = group.train_step(own).metrics
        rank0, rank1 = snapshots(group)
        (got_grads, _) = gradients(group)
    finally:
        group.kill()
    check_gradients(want_grads, got_grads)
    one = plain.parameter_snapshot()
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], one[name], **adam_bound(1), msg=name)
    assert got["objective/kl"] > 1e-3
    for key, value in want.items():
        # padding depends on how the ranks' shares cut into micro-batches, not on the update
        if value is not None and key != "learner/padding_fraction":
            assert got[key] == pytest.approx(value, abs=1e-5), key
    assert 0 <= got["learner/padding_fraction"] < 1


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

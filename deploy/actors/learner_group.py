"""D learner actors as one learner: a Ray placement group, one torch.distributed group.

The driver talks to the group as to a single learner. `prepare` shards the rollouts over the
ranks by token count; its results stay in the object store (`held`) until `train_step`
fetches them, in order; `train_step` gives every rank the whole
batch (each trains its balanced share of every minibatch, see `learner/parallel.py`) and
returns rank 0's result. Rank 0 publishes and writes checkpoints; with `learner.strategy: fsdp`
the other ranks take part (they hold shards of the weights, gathered tensor by tensor), with
DDP they hold identical replicas and stay out of it. Every rank loads, so a checkpoint written
with any D resumes with any other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlfleet.common.collate import balanced_shards
from rlfleet.common.config import RunConfig
from rlfleet.common.records import Experience, Held, Prepared, Rollout, ScoreBatch, StepResult
from rlfleet.common.threads import ThreadBudget
from rlfleet.learner.learner import Learner


class LearnerGroup:
    def __init__(self, handles: Sequence[Any], group: Any = None, sharded: bool = False):
        self.handles = list(handles)
        self.lead = self.handles[0]
        self._group = group
        self.helpers = tuple(self.handles[1:]) if sharded else ()
        """The ranks besides the lead that take part in gathering the weights (publish, save)."""
        self._node_refs: list[ray.ObjectRef] = []
        self._nodes: list[str] | None = None

    @classmethod
    def start(cls, cfg: RunConfig, policy_path: str, critic_path: str | None = None,
              timeout_s: float = 600.0, threads: ThreadBudget | None = None) -> LearnerGroup:
        """`learner.num_workers` actors, placed by one placement group, joined in one process group."""
        d = cfg.learner.num_workers
        res = cfg.cluster.learner
        bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {}), **res.resources}
        group = placement_group([dict(bundle) for _ in range(d)], strategy=cfg.cluster.learner_placement)
        ray.get(group.ready(), timeout=timeout_s)
        actor = ray.remote(Learner)
        handles = [
            actor.options(
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                resources=dict(res.resources) or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            ).remote(cfg, policy_path, critic_path, threads)
            for rank in range(d)
        ]
        learners = cls(handles, group, sharded=d > 1 and cfg.learner.strategy == "fsdp")
        # asked now, read when needed: waiting here would build the learner before the other roles start
        learners._node_refs = [h.__ray_call__.remote(_node_of) for h in handles]
        if d > 1:
            host, port = ray.get(learners.lead.open_dp_group.remote(d), timeout=timeout_s)
            ray.get([h.join_dp_group.remote(rank, d, host, port) for rank, h in enumerate(handles)],
                    timeout=timeout_s)
        return learners

    def lost(self, timeout_s: float = 60.0) -> str | None:
        """After a failure: which rank is gone (its actor dead, or unreachable or not answering
        for `timeout_s`: Ray declares a lost node dead within ~30 s) and on which node, or None
        when every rank answers."""
        deadline = time.monotonic() + timeout_s
        for rank, handle in enumerate(self.handles):
            while True:  # unavailable (its node unreachable) may pass, or become dead once Ray declares it
                left = max(1.0, deadline - time.monotonic())
                try:
                    ray.get(handle.policy_version.remote(), timeout=left)
                    break
                except ray.exceptions.GetTimeoutError:
                    return f"learner rank {rank} {self._where(rank)} did not answer within {timeout_s:.0f} s"
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() >= deadline:
                        return f"learner rank {rank} {self._where(rank)} was unreachable for {timeout_s:.0f} s"
                    time.sleep(1.0)
                except ray.exceptions.RayActorError as err:
                    return f"learner rank {rank} {self._where(rank)} is gone ({type(err).__name__})"
        return None

    @property
    def nodes(self) -> list[str]:
        """The Ray node of each rank, as placed at start (waits for the ranks to be built)."""
        if self._nodes is None:
            self._nodes = ray.get(self._node_refs, timeout=600) if self._node_refs else []
        return self._nodes

    def _where(self, rank: int) -> str:
        node = self.nodes[rank] if rank < len(self.nodes) else ""
        ip, alive = next(((n["NodeManagerAddress"], n["Alive"]) for n in ray.nodes() if n["NodeID"] == node), ("?", False))
        return f"on node {node[:16]} ({ip}, {'alive' if alive else 'dead'})"

    def version(self) -> int:
        return ray.get(self.lead.policy_version.remote())

    def prepare(self, rollouts: Sequence[Rollout]) -> Prepared:
        """Old log-probs (and values, colocated reference) of every rollout, computed by all ranks."""
        held = self.held(self.submit_prepare(rollouts))
        cache: dict = {}
        return Prepared(*(h.fetch(ray.get, cache) for h in held))

    def submit_prepare(self, rollouts: Sequence[Rollout]) -> list[tuple[list[int], ray.ObjectRef]]:
        """`prepare` in flight: (the rollout indices of a rank's shard, its result) per rank used."""
        shards = balanced_shards([len(r.prompt_ids) + len(r.response_ids) for r in rollouts], len(self.handles))
        # Sharded, every rank runs the forward passes together, even with nothing to do.
        return [(s, h.prepare.remote([rollouts[i] for i in s]))
                for h, s in zip(self.handles, shards, strict=True) if s or self.helpers]

    @staticmethod
    def held(pending: list[tuple[list[int], ray.ObjectRef]]) -> tuple[Held, Held, Held]:
        """The old log-probs, values and reference log-probs of `submit_prepare`, left in the
        object store for `train_step` (each `Held.fetch` gives None where prepare made none)."""
        return tuple(Held.of(pending, name) for name in ("old_logprobs", "values", "ref_logprobs"))

    def train_step(self, exp: Experience) -> StepResult:
        return ray.get(self.submit_train(exp))[0]

    def submit_train(self, exp: Experience) -> list[ray.ObjectRef]:
        """`train_step` in flight on every rank (rank 0's result first)."""
        return [h.train_step.remote(exp) for h in self.handles]

    def scale_scores(self, scored: ScoreBatch) -> list[float | None]:
        """`scored`'s scores normalised as the learner trains on them (no statistics move)."""
        return ray.get(self.lead.scale_scores.remote(scored))

    def scale_kl_coef(self, factor: float) -> float:
        """β × `factor` on every rank (they must agree); the new β."""
        return ray.get([h.scale_kl_coef.remote(factor) for h in self.handles])[0]

    def offload(self, timeout_s: float = 600) -> int:
        """`learner.offload`: every rank's state to host memory (each brings it back before it
        next computes); the bytes rank 0 moved."""
        return ray.get([h.offload.remote() for h in self.handles], timeout=timeout_s)[0]

    def save(self, folder: str) -> None:
        ray.get([h.save.remote(folder) for h in (self.lead, *self.helpers)])

    def load(self, folder: str, reward_state: dict | None = None) -> int:
        versions = ray.get([h.load.remote(folder, reward_state) for h in self.handles])
        return versions[0]

    def kill(self) -> None:
        for h in self.handles:
            ray.kill(h, no_restart=True)
        if self._group is not None:
            ray.util.remove_placement_group(self._group)


def _node_of(actor: Any) -> str:
    """Run inside a learner actor (`__ray_call__`): its Ray node."""
    return ray.get_runtime_context().get_node_id()

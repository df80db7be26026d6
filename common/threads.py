"""The thread budget: how many intra-op threads (torch and OpenMP) each actor computes with.

Ray's `num_cpus` is a scheduling token, and Ray turns it into OMP_NUM_THREADS: a one-CPU
actor computes on one thread. But the synchronous loop runs its phases one after another —
generate, then score (reward ∥ reference), then train, then push — so while the learner
trains, the rollout workers and the services idle, and the node's other cores with them.

The rule: an actor may use the cores of its node divided among the actors that compute at the
same time in its phase (`share`): the rollout workers generate together, the reward model and
the reference score together, the data-parallel learners train together. In the overlapped loop
(`rollout.max_staleness` >= 1) the fleet and the learner side compute at once: each gets half. An actor that holds a
GPU computes there, and gets its Ray CPU share (at least one thread) for the host-side work.
`cluster.<role>.threads` overrides the rule. A node's cores are the CPUs this process may run
on, capped by `cap` (the most CPUs any node of the Ray cluster offers, so that a cluster
started with fewer CPUs than the machine has is not exceeded).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadBudget:
    """One role's intra-op threads: `threads` when given, else the node's cores // `share`
    (an actor with a GPU: `gpu_cpus`, at least 1)."""

    threads: int | None = None
    share: int = 1
    gpu_cpus: float | None = None
    cap: int | None = None
    cores: tuple[int, ...] | None = None
    """Pin the actor to these cores (Linux); they are then the cores the budget divides."""

    def resolve(self, cores: int) -> int:
        if self.threads is not None:
            return self.threads
        if self.gpu_cpus is not None:
            return max(1, int(self.gpu_cpus))
        if self.cap is not None:
            cores = min(cores, self.cap)
        return max(1, cores // max(1, self.share))

    def describe(self, cores: int) -> str:
        n = self.resolve(cores)
        if self.threads is not None:
            return f"{n} (set)"
        if self.gpu_cpus is not None:
            return f"{n} (the Ray CPU share of a GPU actor)"
        pinned = f" pinned to cores {list(self.cores)}" if self.cores else ""
        return f"{n} ({min(cores, self.cap or cores)} cores / {self.share} at once{pinned})"


def node_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def apply_thread_budget(budget: ThreadBudget | None) -> int:
    """Set this process's intra-op threads from `budget` (None: leave them) and return them.

    torch's own setter is called even where vLLM's CPU worker has replaced
    `torch.set_num_threads` with a no-op (it does so once its engine binds threads)."""
    import torch

    if budget is not None:
        if budget.cores:
            pin(budget.cores)
        torch._C.set_num_threads(budget.resolve(node_cores()))
    return torch.get_num_threads()


def pin(cores: tuple[int, ...]) -> None:
    """Confine this process to `cores`: every thread it has now (the affinity is per thread on
    Linux), and through inheritance every thread it starts later."""
    tasks = "/proc/self/task"
    tids = [int(t) for t in os.listdir(tasks)] if os.path.isdir(tasks) else [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass

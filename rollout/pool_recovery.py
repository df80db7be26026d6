"""The rollout pool's recovery of failed workers (`rollout/pool.py`): wait for Ray's restart
or spawn a replacement, re-sync the weights; and, while other workers are up, set aside one
whose node is dead (a lost host: Ray restarts the actor only where there is room), so that the
run goes on with the others and the worker rejoins when its restart is placed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from rlfleet.rollout.pool_records import PoolStats, RolloutPoolError, _Slot

logger = logging.getLogger("rlfleet.rollout.pool")
ActorHandle = Any


class WorkerRecovery:
    """Recovery methods of `RolloutPool` (its state: `_slots`, `_down`, `_spawn`, `_source`,
    `_recover_timeout_s`, `_call_timeout_s`, `stats`)."""

    _slots: list[_Slot]
    _down: list[_Slot]
    _spawn: Callable[[], ActorHandle]
    _source: Any
    _recover_timeout_s: float
    _call_timeout_s: float
    _checked_down: float
    stats: PoolStats
    version: int
    num_workers: int

    def _recover(self, slot: _Slot) -> None:
        """Make `slot` usable again: wait for Ray's restart or spawn a replacement; re-sync it.
        While other workers are up and its node is dead, set it aside instead: the run goes on
        without it, and it rejoins when Ray has restarted it somewhere (`_check_down`)."""
        slot.suspect = False
        slot.recoveries += 1
        others_up = any(s is not slot for s in self._slots)
        node_lost = (lambda: not _node_alive(slot.node_id)) if others_up and slot.node_id else None
        back = self._probe(slot.handle, give_up=node_lost)
        if back is None:
            self._set_aside(slot)
            return
        if back:
            self.stats.recovered += 1
        else:
            logger.warning("rollout worker did not come back; spawning a replacement")
            ray.kill(slot.handle, no_restart=True)
            slot.handle = self._spawn()  # the old handle's calls in flight fail and are counted off
            self.stats.replaced += 1
        try:
            self._ensure_current(slot)
        except ActorUnavailableError:
            # A kill that landed after the probe (a worker answers queries while it generates,
            # so the probe may reach the old process): wait for the restart and re-sync again.
            if not self._probe(slot.handle):
                raise RolloutPoolError("a rollout worker restarted during its recovery and did not come back") from None
            self._ensure_current(slot)

    def _set_aside(self, slot: _Slot) -> None:
        self._slots.remove(slot)
        slot.probe, slot.down_since, slot.replaced = slot.handle.policy_version.remote(), time.monotonic(), False
        self._down.append(slot)
        self.stats.lost += 1
        logger.warning("a rollout worker's node %s is dead; going on with %d of %d workers until it is restarted "
                       "elsewhere or the node is back", slot.node_id[:12], len(self._slots), self.num_workers)

    def _check_down(self, wait_s: float) -> None:
        """Bring back the workers set aside that answer again (re-synced first); wait up to
        `wait_s` for the first one when none is up. One still down after the recovery timeout
        is replaced by a new actor, once, which Ray places when there is room (a node joins)."""
        self._checked_down = time.monotonic()
        deadline = time.monotonic() + wait_s
        while self._down:
            for slot in list(self._down):
                ready, _ = ray.wait([slot.probe], timeout=0)
                if ready:
                    try:
                        ray.get(slot.probe)
                    except ActorUnavailableError:  # still restarting: ask again
                        slot.probe = slot.handle.policy_version.remote()
                        continue
                    except RayActorError:  # gone for good (its restarts spent)
                        if not slot.replaced:
                            self._replace_down(slot)
                        continue
                    self._down.remove(slot)
                    self._slots.append(slot)
                    slot.in_flight, slot.probe = 0, None
                    self._ensure_current(slot)
                    self.stats.recovered += 1
                    logger.info("a rollout worker set aside is back: %d of %d up", len(self._slots), self.num_workers)
                elif not slot.replaced and time.monotonic() - slot.down_since > self._recover_timeout_s:
                    self._replace_down(slot)
            if not self._down or self._slots or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if not self._slots:
            raise RolloutPoolError(f"no rollout worker is up: {len(self._down)} lost with their nodes, none restarted "
                                   f"within {wait_s:.0f} s (the cluster has no room for them)")

    def _replace_down(self, slot: _Slot) -> None:
        ray.kill(slot.handle, no_restart=True)
        slot.handle, slot.replaced = self._spawn(), True
        slot.probe = slot.handle.policy_version.remote()
        self.stats.replaced += 1

    def _probe(self, handle: ActorHandle, race_window_s: float = 5.0,
               give_up: Callable[[], bool] | None = None) -> bool | None:
        """Whether the worker answers, after Ray's restart if one is under way. While Ray
        restarts an actor, calls fail with ActorUnavailableError: wait (up to the recovery
        timeout), unless `give_up` says to (None is returned). ActorDiedError means gone for
        good, except right at the moment of a kill: it gets a short window."""
        start = time.monotonic()
        call = handle.policy_version.remote()
        while True:
            try:
                ray.get(call, timeout=1.0 if give_up is not None else self._recover_timeout_s)
                return True
            except GetTimeoutError:
                if give_up is None or time.monotonic() - start > self._recover_timeout_s:
                    return False
                if give_up():
                    return None
                continue
            except ActorUnavailableError:
                if time.monotonic() - start > self._recover_timeout_s:
                    return False
                if give_up is not None and give_up():
                    return None
            except RayActorError:
                if time.monotonic() - start > race_window_s:
                    return False
            time.sleep(0.5)
            call = handle.policy_version.remote()

    def _ensure_current(self, slot: _Slot) -> None:
        """A worker that restarted comes back with the initial weights: load the current ones.
        Notes the node it runs on."""
        info = ray.get(slot.handle.info.remote(), timeout=self._recover_timeout_s)
        slot.node_id = getattr(info, "node_id", "")
        held = ray.get(slot.handle.policy_version.remote(), timeout=self._recover_timeout_s)
        if held == self.version:
            return
        if self._source is None:
            raise RolloutPoolError(f"a worker holds v{held} but the pool has no weights for v{self.version}")
        self._source.load_into([slot.handle], self._call_timeout_s)
        self.stats.resynced += 1


def _node_alive(node_id: str) -> bool:
    """Whether the Ray node is alive (GCS's view: a node is declared dead after its health checks
    fail, ~15-30 s after a host is lost)."""
    return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())

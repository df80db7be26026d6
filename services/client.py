"""One typed client for the reward and reference actors.

A call is submitted and collected separately (so that reward, reference and the learner's
`prepare` run at once). When the actor died under a call, Ray restarts it (the actors are
started with `max_restarts = cluster.service_restarts`), the client waits until it answers,
and makes the same call again; past `restarts` deaths it raises `ServiceError`, naming the
actor and the setting. The services are stateless, so a re-made call needs nothing back.

A service whose node is lost is restarted by Ray wherever a live node can host it. When none
can (the node held the resources it asks for), the client waits `lost_wait_s` for one to join
(Ray's autoscaler adding a node), then raises `ServiceError` naming the service, its dead
node and what it needs (`node_lost` set): the run stops instead of waiting on a call that
cannot be answered.

The reference's log-probs stay in the object store (`Held`): the driver only learns that the
call succeeded (a row count, a second return value) and the learner fetches the rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from rlfleet.common.records import Held, ScoreBatch

logger = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A reward or reference actor kept dying, or did not come back."""

    def __init__(self, message: str, node_lost: bool = False):
        super().__init__(message)
        self.node_lost = node_lost
        """Its node is dead and no live node can host it."""


@dataclass
class Call:
    """A service call in flight: `make()` submits it (again); `ready` is the object whose value
    says it is done; `kept`, where there is one, the result left in the object store."""

    make: Callable[[], tuple[ray.ObjectRef, ray.ObjectRef | None]]
    ready: ray.ObjectRef
    kept: ray.ObjectRef | None
    submitted: float

    @property
    def refs(self) -> list[ray.ObjectRef]:
        return [self.ready] if self.kept is None else [self.ready, self.kept]


class ServiceClient:
    """Calls to one service actor, retried after Ray restarts it."""

    def __init__(self, handle: Any, name: str, restarts: int = 0, back_timeout_s: float = 600.0,
                 call_timeout_s: float = 3600.0, needs: dict[str, float] | None = None, lost_wait_s: float = 120.0):
        self.handle = handle
        self.name = name
        self.restarts = restarts
        self.retries = 0
        """Calls made again because the actor died (cumulative)."""
        self._back_timeout_s = back_timeout_s
        self._call_timeout_s = call_timeout_s
        """The most a call may take (a backstop: a hung service fails the step, named)."""
        self._needs = {k: v for k, v in (needs or {}).items() if v}
        """The resources the actor asks Ray for (where it can be restarted)."""
        self._lost_wait_s = lost_wait_s
        self._node: ray.ObjectRef | str | None = handle.__ray_call__.remote(_node_of)
        """Where the actor runs: asked now (answered once it is built), read when a call waits."""
        self._homeless_since: float | None = None

    def submit(self, method: str, *args: Any, kept: bool = False, **kwargs: Any) -> Call:
        """`method(*args, **kwargs)` in flight; `kept`: the method returns (a small value, the
        result), and the result stays in the object store."""
        def make() -> tuple[ray.ObjectRef, ray.ObjectRef | None]:
            fn = getattr(self.handle, method)
            if kept:
                ready, result = fn.options(num_returns=2).remote(*args, **kwargs)
                return ready, result
            return fn.remote(*args, **kwargs), None

        ready, result = make()
        return Call(make, ready, result, time.perf_counter())

    def result(self, call: Call) -> Any:
        """The value of `call.ready` (the call re-made while the actor died and came back)."""
        deaths = 0
        while True:
            left = call.submitted + self._call_timeout_s - time.perf_counter()
            try:
                value = ray.get(call.ready, timeout=max(0.1, min(left, _CHECK_S)))
                self._homeless_since = None
                return value
            except ray.exceptions.GetTimeoutError as err:
                if left > _CHECK_S:
                    self._check_placeable()  # its node lost while no call was in flight: the call waits for it
                    continue
                raise ServiceError(f"the {self.name} actor did not answer a call within {self._call_timeout_s:g} s; "
                                   "stopping, the last checkpoint is untouched") from err
            except ray.exceptions.RayActorError as err:
                deaths += 1
                if deaths > self.restarts:
                    raise ServiceError(
                        f"the {self.name} actor died {deaths} time(s) (cluster.service_restarts={self.restarts}); "
                        f"stopping, the last checkpoint is untouched: {err}"
                    ) from err
                self.retries += 1
                logger.warning("the %s actor died (%s); retrying after Ray restarts it (%d/%d)",
                               self.name, type(err).__name__, deaths, self.restarts)
                self._wait_until_back()
                call.ready, call.kept = call.make()
                call.submitted = time.perf_counter()

    def health(self, timeout_s: float = 600.0) -> bool:
        return ray.get(self.handle.health.remote(), timeout=timeout_s)

    def _wait_until_back(self) -> None:
        """Block until a restarting actor answers again (its model loads in its constructor)."""
        deadline = time.monotonic() + self._back_timeout_s
        while True:
            try:
                ray.get(self.handle.health.remote(), timeout=_CHECK_S)
                self._node, self._homeless_since = self.handle.__ray_call__.remote(_node_of), None  # placed anew
                return
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as err:
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"the {self.name} actor did not come back within {self._back_timeout_s:g} s") from err
                self._check_placeable()
                time.sleep(0.5)
            except ray.exceptions.ActorDiedError as err:
                raise ServiceError(f"the {self.name} actor died and was not restarted: {err}") from err

    def node(self) -> str:
        """The Ray node the actor runs on ('' while that is not known)."""
        if self._node is None:
            self._node = self.handle.__ray_call__.remote(_node_of)
        if isinstance(self._node, ray.ObjectRef):
            ready, _ = ray.wait([self._node], timeout=0)
            if not ready:
                return ""
            try:
                self._node = ray.get(self._node)
            except ray.exceptions.RayError:
                self._node = None
                return ""
        return self._node

    def _check_placeable(self) -> None:
        """While a call waits: when the actor's node is dead and no live node offers what it
        needs for `lost_wait_s`, raise ServiceError (node_lost)."""
        node = self.node()
        nodes = ray.nodes()
        if not node or any(n["NodeID"] == node and n["Alive"] for n in nodes):
            self._homeless_since = None
            return
        if any(n["Alive"] and all(n["Resources"].get(k, 0.0) >= v for k, v in self._needs.items()) for n in nodes):
            self._homeless_since = None  # Ray restarts it there (or will, once resources free up)
            return
        now = time.monotonic()
        self._homeless_since = self._homeless_since or now
        if now - self._homeless_since < self._lost_wait_s:
            return
        address = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == node), "?")
        raise ServiceError(
            f"the {self.name} actor's node {node[:16]} ({address}) is dead and no live node can host it "
            f"(it needs {self._needs}); waited {self._lost_wait_s:g} s for one to join "
            "(cluster.service_lost_wait_s)", node_lost=True)


_CHECK_S = 2.0
"""How often a waiting call looks at where its actor is."""


def _node_of(actor: Any) -> str:
    """Run inside a service actor (`__ray_call__`): its Ray node."""
    return ray.get_runtime_context().get_node_id()


class RewardClient(ServiceClient):
    """The reward service (`services/reward_service.py`)."""

    def __init__(self, handle: Any, restarts: int = 0, **kwargs: Any):
        super().__init__(handle, "reward", restarts, **kwargs)

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              extras: Sequence[dict]) -> Call:
        return self.submit("score", prompts, responses, extras)

    def scores(self, call: Call) -> ScoreBatch:
        return self.result(call)

    def gold(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
             extras: Sequence[dict]) -> list[float | None]:
        """The gold checker's verdicts (evaluation)."""
        return self.result(self.submit("gold", prompts, responses, extras))


class ReferenceClient(ServiceClient):
    """The reference model (`services/reference.py`)."""

    def __init__(self, handle: Any, restarts: int = 0, **kwargs: Any):
        super().__init__(handle, "reference", restarts, **kwargs)

    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                 temperature: float) -> Call:
        return self.submit("counted_logprobs", prompts, responses, temperature, kept=True)

    def held(self, call: Call) -> Held:
        """The call's log-probs, left in the object store for the learner."""
        count = self.result(call)
        return Held.of([(list(range(count)), call.kept)])

"""One vLLM engine shared by concurrent calls: continuous batching across calls, and weight
loads that land between two engine steps.

A worker actor takes many calls at once (each prompt group is its own call, see
`rollout/pool.py`). Each call adds its requests to the engine loop and waits for them; one
thread owns the engine and steps it while any request is live, so requests of every call
share its batch. Requests are added one per sample (n = 1) with DELTA outputs; each token's
weight version is recorded.

Exclusive operations (a weight load, sleep, wake-up) run on the loop's thread between two
steps. Without `interrupt` an operation waits until the running requests finish (calls that
arrive meanwhile wait for it), so each response comes from one version: a push lands between
two requests. With `interrupt` (`rollout.partial_rollout`) it runs at once: the running
requests are aborted, and after it each is added again as its prompt followed by its tokens so
far, asking for the tokens it has left (`max_tokens`, `min_tokens` less what it has). The
engine recomputes their KV cache with the new weights (the prefix cache is reset at a load).
Stop strings are matched by vLLM within one stretch between two pushes: a stop string that
straddles a push is not seen (stop token ids, such as EOS, always are).

Every wait has a deadline; when it passes the error names what was awaited, and a call's
requests are aborted.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)
_ids = itertools.count()


@dataclass
class Stretch:
    """One request's response, built across pushes."""

    prompt: list[int]
    params: Any
    """Its vLLM SamplingParams (n=1), as first asked."""
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str | None = None


@dataclass(eq=False)
class _Call:
    stretches: list[Stretch]
    left: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Op:
    fn: Callable[[], int | None]
    what: str
    done: threading.Event = field(default_factory=threading.Event)
    result: int | None = None
    error: BaseException | None = None


class EngineLoop:
    """A vLLM `LLMEngine` stepped by one thread for every call of its worker."""

    def __init__(self, engine: Any, version: int, deadline_s: float, interrupt: bool = False,
                 threads: int | None = None):
        """`threads`: the intra-op threads the engine was built with; OpenMP's thread count is
        per calling thread, and vLLM's CPU attention checks that each step uses the same."""
        self._engine = engine
        self._threads = threads
        self.version = version
        """The version of the weights the engine holds (a load's function returns the new one)."""
        self._deadline_s = deadline_s
        self._interrupt = interrupt
        self._cv = threading.Condition()
        self._incoming: deque[_Call] = deque()
        self._ops: deque[_Op] = deque()
        self._live: dict[str, tuple[Stretch, _Call]] = {}
        self._pins = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rlfleet-engine-loop", daemon=True)
        self._thread.start()

    @property
    def generating(self) -> bool:
        """Whether requests are running on the engine now."""
        return bool(self._live)

    def generate(self, prompts: Sequence[list[int]], params: Sequence[Any]) -> list[Stretch]:
        """One response per (prompt, params n=1), through the shared engine."""
        call = _Call([Stretch(list(p), sp) for p, sp in zip(prompts, params, strict=True)], len(prompts))
        if not prompts:
            return []
        with self._cv:
            self._check_open()
            self._incoming.append(call)
            self._cv.notify_all()
        if not call.done.wait(self._deadline_s):
            call.cancelled = True  # the loop aborts its requests
            with self._cv:
                self._cv.notify_all()
            raise TimeoutError(f"waited {self._deadline_s:g} s for {len(prompts)} requests on the engine")
        if call.error is not None:
            raise RuntimeError(f"the engine failed: {call.error}") from call.error
        return call.stretches

    def run(self, fn: Callable[[], int | None], what: str) -> int | None:
        """Run `fn` on the loop's thread between two steps (see the module's note); a version it
        returns becomes the engine's."""
        op = _Op(fn, what)
        with self._cv:
            self._check_open()
            self._ops.append(op)
            self._cv.notify_all()
        if not op.done.wait(self._deadline_s):
            with self._cv:
                if op in self._ops:  # never run late (one already running ends on its own)
                    self._ops.remove(op)
            raise TimeoutError(f"waited {self._deadline_s:g} s for the engine to run {what} "
                               f"({len(self._live)} requests running)")
        if op.error is not None:
            raise RuntimeError(f"{what} failed: {op.error}") from op.error
        return op.result

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """No exclusive operation runs inside (a multi-turn call: every turn on one version);
        calls made meanwhile are admitted even while an operation waits."""
        with self._cv:
            self._pins += 1
        try:
            yield
        finally:
            with self._cv:
                self._pins -= 1
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine loop is closed")

    # ------------------------------------------------------------------ the loop's thread
    def _run(self) -> None:
        if self._threads:
            import torch

            torch._C.set_num_threads(self._threads)  # vLLM's CPU worker made the public setter a no-op
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._live or self._incoming
                                  or (self._ops and not self._pins))
                if self._closed:
                    self._fail_all(RuntimeError("the engine loop was closed"))
                    return
                free = not self._pins and (self._interrupt or not self._live)
                op = self._ops.popleft() if self._ops and free else None
                # a waiting operation holds back new calls, so the running requests drain
                # (unless a pinned call, which the operation waits for, needs its next turn)
                incoming = [] if self._ops and not self._pins else list(self._incoming)
                if incoming:
                    self._incoming.clear()
            try:
                if op is not None:
                    self._exclusive(op)
                for call in incoming:
                    if call.cancelled:
                        continue
                    for st in call.stretches:
                        self._add(st, call)
                self._drop_cancelled()
                if self._live:
                    self._step()
            except Exception as err:  # noqa: BLE001 - every waiting call hears of it
                logger.exception("the engine loop failed")
                with self._cv:
                    self._fail_all(err)

    def _exclusive(self, op: _Op) -> None:
        running = [st_call for st_call in self._live.values()]
        if running:
            self._engine.abort_request(list(self._live))
            self._live.clear()
        try:
            result = op.fn()
            if result is not None:
                self.version = result
            op.result = result
        except BaseException as err:  # noqa: BLE001 - the caller raises it
            op.error = err
        finally:
            op.done.set()
        for st, call in running:
            self._add(st, call)

    def _add(self, st: Stretch, call: _Call) -> None:
        from vllm.sampling_params import RequestOutputKind

        sp = st.params.clone()
        sp.output_kind = RequestOutputKind.DELTA
        if st.ids:
            sp.max_tokens = st.params.max_tokens - len(st.ids)
            sp.min_tokens = max(0, (st.params.min_tokens or 0) - len(st.ids))
        key = f"rlfleet-{next(_ids)}"
        self._live[key] = (st, call)
        self._engine.add_request(key, {"prompt_token_ids": st.prompt + st.ids}, sp)

    def _step(self) -> None:
        for out in self._engine.step():
            entry = self._live.get(out.request_id)
            if entry is None:
                continue
            st, call = entry
            comp = out.outputs[0]
            new = list(comp.token_ids)
            st.ids += new
            st.logprobs += [lp[tok].logprob for tok, lp in zip(new, comp.logprobs, strict=True)]
            st.versions += [self.version] * len(new)
            if out.finished:
                st.finish = "length" if comp.finish_reason == "length" else "stop"
                del self._live[out.request_id]
                call.left -= 1
                if call.left == 0:
                    call.done.set()

    def _drop_cancelled(self) -> None:
        gone = [key for key, (_, call) in self._live.items() if call.cancelled]
        if gone:
            self._engine.abort_request(gone)
            for key in gone:
                del self._live[key]

    def _fail_all(self, err: BaseException) -> None:
        """Under the lock: every waiting call and operation fails with `err`."""
        calls = {id(c): c for _, c in self._live.values()} | {id(c): c for c in self._incoming}
        if self._live:
            try:
                self._engine.abort_request(list(self._live))
            except Exception:  # noqa: BLE001 - failing anyway
                pass
        self._live.clear()
        self._incoming.clear()
        for call in calls.values():
            call.error = err
            call.done.set()
        while self._ops:
            op = self._ops.popleft()
            op.error = err
            op.done.set()

"""Interruptible generation for `rollout.partial_rollout`: the vLLM engine is stepped by hand,
so that a weight push can land between two engine steps instead of after the whole call.

At a push the requests still running are aborted, the weights are loaded, and each request is
added again with its prompt followed by the tokens it generated so far, asking for the tokens it
has left (`max_tokens` and `min_tokens` less what it has). The engine recomputes their KV cache
with the new weights (the prefix cache is reset at every load), so each later token is sampled
from the new policy given the whole response so far; every token's version is recorded.

Stop strings are matched by vLLM within one stretch between two pushes: a stop string that
straddles a push is not seen (stop token ids, such as EOS, always are).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

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


def run_stepped(engine: Any, prompts: Sequence[list[int]], params: Sequence[Any], version: int,
                take_push: Callable[[], Callable[[], int] | None]) -> list[Stretch]:
    """Generate one response per (prompt, params) with `engine` (a vLLM LLMEngine) holding
    weights `version`. After every engine step, `take_push()` returns a staged push or None; a
    push (a function that loads the weights and returns their version) runs once the running
    requests are aborted, and they continue from their tokens so far under the new weights."""
    from vllm.sampling_params import RequestOutputKind

    requests = [Stretch(list(p), sp) for p, sp in zip(prompts, params, strict=True)]
    live: dict[str, Stretch] = {}

    def add(req: Stretch) -> None:
        sp = req.params.clone()
        sp.output_kind = RequestOutputKind.DELTA
        if req.ids:
            sp.max_tokens = req.params.max_tokens - len(req.ids)
            sp.min_tokens = max(0, (req.params.min_tokens or 0) - len(req.ids))
        key = f"rlfleet-stepped-{next(_ids)}"
        live[key] = req
        engine.add_request(key, {"prompt_token_ids": req.prompt + req.ids}, sp)

    for req in requests:
        add(req)
    current = version
    try:
        while live:
            for out in engine.step():
                req = live.get(out.request_id)
                if req is None:
                    continue
                comp = out.outputs[0]
                new = list(comp.token_ids)
                req.ids += new
                req.logprobs += [lp[tok].logprob for tok, lp in zip(new, comp.logprobs, strict=True)]
                req.versions += [current] * len(new)
                if out.finished:
                    req.finish = "length" if comp.finish_reason == "length" else "stop"
                    del live[out.request_id]
            push = take_push() if live else None
            if push is not None:
                running = list(live.values())
                engine.abort_request(list(live))
                live.clear()
                current = push()
                for req in running:
                    add(req)
    except BaseException:
        if live:
            engine.abort_request(list(live))
        raise
    return requests


@dataclass
class _Push:
    apply: Callable[[], int]
    done: bool = False
    result: int | None = None
    error: BaseException | None = None


class PushGate:
    """Who holds a worker's engine: one generate call or one weight load at a time. A load that
    arrives while a generate call holds it is staged; the call runs it between two engine steps
    (`take`) or, at the latest, when it ends; the load returns once it ran, within `deadline_s`."""

    def __init__(self, deadline_s: float):
        self._cv = threading.Condition()
        self._holder: str | None = None
        self._staged: _Push | None = None
        self._deadline_s = deadline_s

    @property
    def generating(self) -> bool:
        return self._holder == "a generate call"

    def _acquire(self, holder: str, what: str) -> None:
        """Under the lock: wait until nobody holds the engine, then hold it."""
        if not self._cv.wait_for(lambda: self._holder is None, timeout=self._deadline_s):
            raise TimeoutError(f"waited {self._deadline_s:g} s for the engine (held by {self._holder}) to {what}")
        self._holder = holder

    def _release(self) -> None:
        with self._cv:
            self._holder = None
            self._cv.notify_all()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """A generate call's hold on the engine."""
        with self._cv:
            self._acquire("a generate call", "generate")
        try:
            yield
        finally:
            try:  # a push staged until the very end runs before the engine is let go
                while (push := self._take(release=True)) is not None:
                    push()
            except BaseException:
                self._release()
                raise

    def take(self) -> Callable[[], int] | None:
        """The staged push, to run now (in the generate call's thread), or None."""
        return self._take(release=False)

    def _take(self, release: bool) -> Callable[[], int] | None:
        with self._cv:
            staged, self._staged = self._staged, None
            if staged is None:
                if release:
                    self._holder = None
                    self._cv.notify_all()
                return None

        def run() -> int:
            try:
                staged.result = staged.apply()
                return staged.result
            except BaseException as err:
                staged.error = err
                raise
            finally:
                with self._cv:
                    staged.done = True
                    self._cv.notify_all()

        return run

    def load(self, apply: Callable[[], int], what: str) -> int:
        """Run `apply` (a weight load returning its version): at once when the engine is free,
        else staged for the generate call that holds it."""
        with self._cv:
            if self.generating and self._staged is None:
                push = self._staged = _Push(apply)
                self._cv.notify_all()
                if not self._cv.wait_for(lambda: push.done, timeout=self._deadline_s):
                    if self._staged is push:
                        self._staged = None
                    raise TimeoutError(f"waited {self._deadline_s:g} s for the running generate call to take {what}")
                if push.error is not None:
                    raise RuntimeError(f"{what} failed in the generate call: {push.error}") from push.error
                return push.result
            self._acquire("a weight load", what)
        try:
            return apply()
        finally:
            self._release()

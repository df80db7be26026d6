"""Calls to `package.module:function` paths in separate, pre-started processes, each call
under its own time limit.

The worker processes are spawned, and import every path they will be asked to call, when
the `ProcessWorkers` is built: a call's timeout covers that call alone, never a process's
start-up (spawning re-imports the parent's main module, which can take seconds when it
imports torch). A call is handed to an idle, ready worker; its clock starts then. A call
past its limit is answered `timeout` and its process is killed and replaced; a process that
dies in a call (a crash, `os._exit`, the memory limit) is answered `crashed` and replaced.
The replacement's start-up counts against no call.
"""

from __future__ import annotations

import importlib
import multiprocessing
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

START_TIMEOUT_S = 120.0
"""How long a worker process may take to start and import its paths."""


def import_path(path: str) -> Any:
    """The object named by `package.module:attribute` or `path/to/file.py:attribute` (a file
    path as verl's `custom_reward_function.path` takes it; relative to the working directory)."""
    module_name, _, attr = path.rpartition(":")
    if module_name.endswith(".py"):
        return getattr(_import_file(module_name), attr)
    return getattr(importlib.import_module(module_name), attr)


def _import_file(file: str) -> Any:
    import hashlib
    import importlib.util
    import sys
    from pathlib import Path

    resolved = Path(file).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"no such file: {file}")
    name = f"rlfleet_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, resolved)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _serve(conn: Connection, paths: Sequence[str], memory_bytes: int | None) -> None:
    """A worker process: import the paths, say ready, then answer (path, args) calls with
    ('ok', value) or ('error', description)."""
    if memory_bytes is not None:  # on top of what the started interpreter already maps
        import os
        import resource

        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_bytes, mapped + memory_bytes))
    loaded: dict[str, Any] = {}
    for path in paths:
        try:
            loaded[path] = import_path(path)
        except Exception:  # noqa: BLE001, S110 - reported by the call that needs it
            pass
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        path, args = request
        try:
            fn = loaded.get(path) or loaded.setdefault(path, import_path(path))
            reply = ("ok", fn(*args))
        except BaseException as err:  # noqa: BLE001 - a call's failure is data, not a crash
            reply = ("error", f"{type(err).__name__}: {err}")
        try:
            conn.send(reply)
        except Exception as err:  # noqa: BLE001 - e.g. an unpicklable return value
            conn.send(("error", f"the result could not be sent back ({type(err).__name__}: {err})"))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    started: float
    ready: bool = False
    call: int | None = None
    """Index of the call it runs."""
    deadline: float = 0.0


class ProcessWorkers:
    """`processes` worker processes that run calls to the given paths."""

    def __init__(self, paths: Sequence[str], processes: int, memory_mb: int | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, name: str = "worker"):
        self._paths = list(paths)
        self._memory = memory_mb * 2**20 if memory_mb is not None else None
        self._start_timeout = start_timeout_s
        self._name = name
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [self._spawn() for _ in range(processes)]
        deadline = time.monotonic() + start_timeout_s
        while not all(w.ready for w in self._workers):
            self._receive(deadline - time.monotonic(), outcomes=[])

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(child, self._paths, self._memory), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent, time.monotonic())

    def run(self, path: str, calls: Sequence[tuple], timeout_s: float) -> list[tuple[str, Any]]:
        """One reply per call, in order: ('ok', value), ('error', description), ('timeout',
        None) or ('crashed', exit code)."""
        pending = deque(range(len(calls)))
        outcomes: list[tuple[str, Any] | None] = [None] * len(calls)
        while pending or any(w.call is not None for w in self._workers):
            for worker in list(self._workers):
                if pending and worker.ready and worker.call is None:
                    worker.call = pending.popleft()
                    worker.deadline = time.monotonic() + timeout_s
                    try:
                        worker.conn.send((path, calls[worker.call]))
                    except (BrokenPipeError, ConnectionResetError):  # it died while idle
                        pending.appendleft(worker.call)
                        worker.call = None
                        self._replace(worker, outcomes, ("crashed", _exit_code(worker)))
            busy = [w.deadline for w in self._workers if w.call is not None]
            starting = [w.started + self._start_timeout for w in self._workers if not w.ready]
            self._receive(min(busy + starting) - time.monotonic(), outcomes)
        return outcomes  # type: ignore[return-value]

    def _receive(self, wait_s: float, outcomes: list) -> None:
        """Take what arrives within `wait_s`; then cut calls past their deadline and fail
        workers that did not start in time."""
        by_conn = {w.conn: w for w in self._workers}
        for conn in wait(list(by_conn), timeout=max(wait_s, 0.0)):
            worker = by_conn[conn]
            try:
                kind, value = conn.recv()
            except (EOFError, OSError):
                self._replace(worker, outcomes, ("crashed", _exit_code(worker)))
                continue
            if kind == "ready":
                worker.ready = True
            else:
                outcomes[worker.call] = (kind, value)
                worker.call = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.call is not None and now >= worker.deadline:
                self._replace(worker, outcomes, ("timeout", None))
            elif not worker.ready and now >= worker.started + self._start_timeout:
                self.close()
                raise TimeoutError(f"{self._name} process did not start and import {self._paths} "
                                   f"within {self._start_timeout:.0f} s")

    def _replace(self, worker: _Worker, outcomes: list, outcome: tuple[str, Any]) -> None:
        if not worker.ready:
            self.close()
            raise RuntimeError(f"{self._name} process exited while starting (exit code "
                               f"{worker.process.exitcode}); it imports {self._paths}")
        if worker.call is not None:
            outcomes[worker.call] = outcome
        _stop(worker)
        self._workers[self._workers.index(worker)] = self._spawn()

    def close(self) -> None:
        for worker in self._workers:
            _stop(worker)
        self._workers = []


def _exit_code(worker: _Worker) -> int | None:
    """The exit code of a worker whose pipe closed: the pipe closes as the process exits,
    a moment before the process can be reaped, so wait (briefly) for that."""
    worker.process.join(timeout=5)
    return worker.process.exitcode


def _stop(worker: _Worker) -> None:
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join(timeout=5)
    worker.conn.close()

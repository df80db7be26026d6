"""Named alternatives (estimators, losses): a plain dict whose unknown key names the valid ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class UnknownNameError(KeyError):
    """A registry lookup of a name that is not there; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(dict):
    """A plain dict of named alternatives whose missing key names the valid ones."""

    def __init__(self, kind: str, entries: dict | None = None):
        super().__init__(entries or {})
        self.kind = kind

    def __missing__(self, key: str):
        raise UnknownNameError(f"unknown {self.kind} {key!r}; valid names: {', '.join(sorted(self))}")

    def register(self, name: str, info: Any) -> Callable[[Callable], Callable]:
        """A decorator that adds a function under `name`, its capabilities as `fn.info`."""

        def add(fn: Callable) -> Callable:
            fn.info = info  # type: ignore[attr-defined]
            self[name] = fn
            return fn

        return add

"""Tools for the tests, imported by name (`tests.services.tool_fixtures:NAME`)."""

from __future__ import annotations

import os
import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


def sleeps(seconds: int) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long.
    """
    time.sleep(seconds)
    return "awake"


def hogs(megabytes: int) -> int:
    """Allocate memory and keep it.

    Args:
        megabytes: how much.
    """
    block = bytearray(megabytes * 2**20)
    return len(block)


def dies() -> str:
    """End its own process."""
    os._exit(3)


def raises() -> str:
    """Raise."""
    raise RuntimeError("tool bug")

"""Find this machine's processes by title: Ray titles its workers `ray::<Class>[.method]`."""

from __future__ import annotations

from pathlib import Path


def pids_titled(prefix: bytes, environ_entry: bytes | None = None, unless: bytes | None = None) -> set[int]:
    """PIDs of the processes whose title starts with `prefix` (and does not contain `unless`),
    and, if given, whose environment holds `environ_entry` (`NAME=value`)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0]
            if not title.startswith(prefix) or (unless is not None and unless in title):
                continue
            if environ_entry is None or environ_entry in (proc / "environ").read_bytes().split(b"\0"):
                found.add(int(proc.name))
        except (OSError, ValueError):
            continue
    return found

"""Run checkpoints: `run_dir/checkpoints/step_NNNNNNNN/`, written whole or not at all.

A checkpoint is written into a hidden temporary folder, its `trainer_state.json` last, then
renamed into place (an atomic rename on one filesystem); only the last `keep_last` complete
ones are kept. A folder without `trainer_state.json` (a crash mid-write) is never resumed from.

With `checkpoint.keep_best`, `best.json` names the checkpoint with the best evaluation so far
(step, metric, value); that folder is never removed by `keep_last`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
BEST_FILE = "best.json"


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def best(self) -> dict[str, Any] | None:
        """{step, metric, value, path} of the best checkpoint so far, if one was marked and
        its folder is complete."""
        path = self.root / BEST_FILE
        if not path.is_file():
            return None
        best = json.loads(path.read_text())
        folder = self.folder(best["step"])
        return {**best, "path": str(folder)} if (folder / STATE_FILE).is_file() else None

    def mark_best(self, step: int, metric: str, value: float) -> None:
        """Record the complete checkpoint of `step` as the best (written whole, then renamed)."""
        if not (self.folder(step) / STATE_FILE).is_file():
            raise FileNotFoundError(f"no complete checkpoint of step {step} to mark as the best")
        tmp = self.root / f".tmp-{BEST_FILE}"
        tmp.write_text(json.dumps({"step": step, "metric": metric, "value": value}))
        os.replace(tmp, self.root / BEST_FILE)

    def forget_best(self) -> None:
        """A fresh run starts with no best (a previous run's best.json in the folder is stale)."""
        (self.root / BEST_FILE).unlink(missing_ok=True)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.exists():
            return []
        found = [p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def remove_partial(self) -> list[Path]:
        """Delete what a crash mid-write left (temporary folders, folders without their state
        file); returns what was removed. Complete checkpoints are never touched."""
        if not self.root.exists():
            return []
        partial = [p for p in self.root.iterdir() if p.is_dir() and (
            p.name.startswith(".tmp-") or (p.name.startswith("step_") and not (p / STATE_FILE).is_file()))]
        for folder in partial:
            shutil.rmtree(folder, ignore_errors=True)
        return partial

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, write: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """`write(tmp)` fills the folder; `state` becomes its trainer_state.json; then rename."""
        final = self.folder(step)
        tmp = self.root / f".tmp-step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1, sort_keys=True))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        best = self.best()
        for old in self.complete()[: -self.keep_last]:
            if best is None or str(old) != best["path"]:
                shutil.rmtree(old, ignore_errors=True)
        return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())

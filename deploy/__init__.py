"""Running RL jobs, in three layers (an import-linter contract keeps them apart):

- `actors/`: where each role becomes a Ray actor, from the config; the learner group; the
  set of actors a run (`Parts`) or an evaluation starts and stops together;
- `loop/`: the training loop, the stages of a step and the synchronous and overlapped loops
  that run them, and what watches a run between steps;
- `app/`: the Python API (`Trainer`), the CLI, `ray job submit`, the control actor, demos,
  reports, supervised stages and input checks.

`Trainer` is imported on first use: actors whose classes live in this package (the run's
control actor) then start without importing torch, transformers and the whole loop.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from rlfleet.deploy.app.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'rlfleet.deploy' has no attribute {name!r}")

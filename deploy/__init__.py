"""Assembly, the driver loop, the Python API (`Trainer`) and the CLI.

`Trainer` is imported on first use: actors whose classes live in this package (the run's
control actor) then start without importing torch, transformers and the whole driver.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from rlfleet.deploy.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'rlfleet.deploy' has no attribute {name!r}")

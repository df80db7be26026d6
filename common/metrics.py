"""The metrics sink: one JSON object per step in `metrics.jsonl`, optionally TensorBoard and W&B.

A resumed run first cuts the file back to the steps its checkpoint covers, so a step that ran
after the last checkpoint is not counted twice.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends `{"step": k, name: value, ...}` lines; None is written as null (metric n/a)."""

    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("logging.tensorboard=true needs the tensorboard package "
                                   "(pip install tensorboard)") from err
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("logging.wandb_project needs the wandb package (pip install wandb)") from err
            self._wandb = wandb.init(project=wandb_project, config=dict(config or {}), dir=str(run_dir))

    def truncate_after(self, step: int) -> None:
        """Keep only the lines of steps <= `step` (resuming from that step's checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: Mapping[str, float | None]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if k != "step" and v is not None}
        if self._tb is not None:
            for name, value in numeric.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every line of a run's metrics file."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _clean(value: float | None) -> float | None:
    """JSON has no NaN or inf: they are written as null (and logged)."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        logger.warning("non-finite metric value %r written as null", value)
        return None
    return value

"""A PNG report of a run's `metrics.jsonl`: reward, KL, entropy, response length and held-out
score over steps (matplotlib, no display needed). The held-out panel shows the training
reward (the proxy, left axis) and, when the run has a gold checker, `eval/gold` (right axis)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from rlfleet.common.metrics import read_metrics  # noqa: E402

PANELS = (
    ("reward", "mean reward (train samples)"),
    ("objective/kl", "KL to the reference (per response)"),
    ("objective/entropy", "entropy (nats per response)"),
    ("completions/mean_length", "response length (tokens)"),
    ("eval/reward", "held-out (greedy): training reward"),
)
AGENT_PANELS = (
    ("reward", "mean episode reward (train)"),
    ("episode/turns", "model turns per episode (train)"),
    ("episode/tool_error_rate", "tool-call error rate (train)"),
    ("completions/mean_length", "generated tokens per episode"),
    ("eval/reward", "held-out (greedy): episode reward"),
)
GOLD = "eval/gold"
RAW_PROXY = "eval/reward_model"
"""Drawn instead of eval/reward where a run has it: normalisation does not move its scale."""


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _gold(ax, rows: Sequence[Mapping[str, Any]]) -> None:
    steps, values = _series(rows, GOLD)
    if steps:
        twin = ax.twinx()
        twin.plot(steps, values, marker="s", markersize=4, color="tab:red")
        twin.set_ylabel("gold (task checker)", color="tab:red", fontsize=8)


def write_report(runs: Mapping[str, str | Path], out: str | Path, title: str = "rlfleet run",
                 panels: Sequence[tuple[str, str]] = PANELS) -> Path:
    """One row of panels per run (label → run folder), one panel per metric; noisy per-step
    curves get a 5-step running mean on top."""
    data = {label: read_metrics(folder) for label, folder in runs.items()}
    fig, axes = plt.subplots(len(data), len(panels), figsize=(4.0 * len(panels), 3.2 * len(data)), squeeze=False)
    for row, (run, rows) in zip(axes, data.items(), strict=True):
        for ax, (key, label) in zip(row, panels, strict=True):
            if key == "eval/reward" and any(r.get(RAW_PROXY) is not None for r in rows):
                key, label = RAW_PROXY, "held-out (greedy): reward-model score (raw)"
            steps, values = _series(rows, key)
            if key.startswith("eval/"):
                ax.plot(steps, values, marker="o", markersize=4, color="tab:green")
                _gold(ax, rows)
                if any(r.get(GOLD) is not None for r in rows):
                    label = f"{label} (green)\nand gold checker (red)"
            elif steps:
                ax.plot(steps, values, alpha=0.35, color="tab:blue")
                ax.plot(steps, _smooth(values), color="tab:blue")
            ax.set_title(f"{run}\n{label}", fontsize=9)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

"""Every benchmark, one after the other, then a markdown table and the plots.

    .venv/bin/python bench/run_all.py

Runs (each its own process, so one's Ray cluster and memory never touch the next's):

- e2e_grpo.py: rlfleet (synchronous and max_staleness 1) against TRL's GRPOTrainer, seconds
  per step, reward curves (also against wall-clock time), and rlfleet's step breakdown;
- disaggregated.py: the fleet and the learner side pinned to one core each, synchronous
  against max_staleness 1: trained samples/s and each role's busy share;
- rollout_throughput.py: vLLM against HF generation tokens/s, 1 against 2 vLLM workers;
- weight_push.py: push latency and bytes/s at ~1M, ~10M and ~100M parameters;
- learner_throughput.py: tokens/s and peak memory (tiny, ~100M), D = 1 against D = 2;
- reward_throughput.py: the reward model's micro-batching.

Writes bench/results/*.json (one per benchmark), bench/results/summary.md (the table, with the
command behind each number) and bench/results/{step_breakdown,throughput_vs_workers,
reward_curves}.png. `--only NAME[,NAME]` runs some; `--report` only rewrites the table and
plots from the JSON already there. About 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# name (its results/NAME.json) → the script and the arguments it runs with here: the scripts'
# defaults, made shorter where a full run would not fit the 20-minute budget on 2 cores
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "e2e_grpo": ("e2e_grpo", ["--steps", "30", "--rounds", "2"]),
    "disaggregated": ("disaggregated", ["--steps", "20", "--rounds", "2"]),
    "rollout_throughput": ("rollout_throughput", ["--dtypes", "float32", "--rounds", "3"]),
    # a 21M-parameter model, where vLLM's engine pays for itself on CPU (pool: the tiny model's run)
    "rollout_throughput_21m": ("rollout_throughput", ["--dtypes", "float32", "--rounds", "2", "--no-pool",
                                                      "--hidden-size", "512", "--layers", "8", "--heads", "16"]),
    "weight_push": ("weight_push", ["--pushes", "3"]),
    "learner_throughput": ("learner_throughput", ["--steps", "3"]),
    "reward_throughput": ("reward_throughput", []),
}


def command(name: str) -> str:
    script, args = BENCHMARKS[name]
    out = [] if script == name else ["--out", f"bench/results/{name}.json"]
    return " ".join([".venv/bin/python", f"bench/{script}.py", *args, *out])


def run(names: list[str]) -> tuple[dict[str, float], list[str]]:
    """Wall seconds of each benchmark, and the ones that failed (the others still run)."""
    seconds, failed = {}, []
    for name in names:
        line = command(name)
        print(f"== {line}", flush=True)  # noqa: T201
        (RESULTS / f"{name}.json").unlink(missing_ok=True)  # no stale numbers in the table
        began = time.perf_counter()
        if subprocess.run([sys.executable, *line.split()[1:]], cwd=BENCH.parent).returncode:
            failed.append(name)
        seconds[name] = time.perf_counter() - began
    return seconds, failed


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


Row = tuple[str, str, str]  # measurement, value, command


def _e2e_rows(e2e: dict) -> list[Row]:
    c = command("e2e_grpo")
    b = e2e["step_breakdown_seconds"]
    shares = step_shares(b)
    return [
        ("GRPO end to end: rlfleet s/step", fmt(e2e["rlfleet_seconds_per_step"]), c),
        ("GRPO end to end: TRL GRPOTrainer s/step", fmt(e2e["trl_seconds_per_step"]), c),
        ("GRPO end to end: TRL s/step ÷ rlfleet s/step", fmt(e2e["ratio_trl_over_rlfleet_seconds_per_step"]), c),
        ("GRPO end to end: rlfleet max_staleness 1 s/step", fmt(e2e["rlfleet_async_seconds_per_step"]), c),
        ("GRPO end to end: rlfleet max_staleness 1 s/step ÷ TRL s/step",
         fmt(e2e["ratio_async_over_trl_seconds_per_step"]), c),
        ("GRPO reward, mean of the last 5 steps: sync / max_staleness 1 / TRL",
         " / ".join(f"{e2e['reward_last5'][k]:.3f}" for k in ("rlfleet", "rlfleet_async", "trl")), c),
        ("GRPO startup: rlfleet / TRL (s)", f"{fmt(e2e['rlfleet_startup_seconds'])} / {fmt(e2e['trl_startup_seconds'])}", c),
        ("GRPO reward, first → last 5 steps: rlfleet",
         f"{_mean(e2e['reward_rlfleet'][:5]):.2f} → {_mean(e2e['reward_rlfleet'][-5:]):.2f}", c),
        ("GRPO reward, first → last 5 steps: TRL",
         f"{_mean(e2e['reward_trl'][:5]):.2f} → {_mean(e2e['reward_trl'][-5:]):.2f}", c),
        ("rlfleet step breakdown (share of a step)", ", ".join(f"{k} {v:.0%}" for k, v in shares.items()), c),
        ("inside `score` (concurrent calls), s",
         ", ".join(f"{k} {fmt(b[k])}" for k in ("reward", "reference", "old_logprobs") if k in b), c),
    ]


def _disaggregated_rows(dis: dict) -> list[Row]:
    c = command("disaggregated")
    busy = lambda mode: ", ".join(f"{k} {v:.0%}" for k, v in dis[f"{mode}_busy"].items())  # noqa: E731
    return [
        ("disaggregated (fleet on core 0, learner side on core 1): trained samples/s sync / max_staleness 1",
         f"{fmt(dis['sync_samples_per_s'])} / {fmt(dis['async_samples_per_s'])}", c),
        ("disaggregated: max_staleness 1 ÷ sync, trained samples/s", fmt(dis["ratio_async_over_sync"]), c),
        ("disaggregated: busy share of the wall time, sync", busy("sync"), c),
        ("disaggregated: busy share of the wall time, max_staleness 1", busy("async"), c),
        ("disaggregated: reward first → mean of last 5 steps, sync / max_staleness 1",
         f"{dis['sync_reward_first']:.2f} → {dis['sync_reward_last5']:.2f} / "
         f"{dis['async_reward_first']:.2f} → {dis['async_reward_last5']:.2f}", c),
    ]


def _rollout_rows(name: str, roll: dict) -> list[Row]:
    c = command(name)
    model = f"{roll['setup']['parameters'] / 1e6:.1f}M params"
    rows = []
    for key, value in roll.items():
        if key.startswith("ratio_"):
            rows.append((f"rollout {model}: {key.removeprefix('ratio_').replace('_', ' ')}", fmt(value), c))
        elif isinstance(value, dict) and "tokens_per_s" in value:
            rows.append((f"rollout {model}: tokens/s {key.replace('_', ' ')}", fmt(value["tokens_per_s"]), c))
    return rows


def _push_rows(push: dict) -> list[Row]:
    c = command("weight_push")
    return [(f"weight push {row['parameters'] / 1e6:.1f}M params, {path.replace('_', ' ')}",
             f"{fmt(row[path]['seconds'])} s, {row[path]['bytes_per_s'] / 1e6:.0f} MB/s", c)
            for size, row in push.items() if size != "setup" for path in ("object_store", "broadcast")]


def _learner_rows(learner: dict) -> list[Row]:
    c = command("learner_throughput")
    rows = [(f"learner {row['parameters'] / 1e6:.1f}M params, {row.get('dtype', 'float32')}: tokens/s (fwd+bwd+AdamW), peak RSS",
             f"{fmt(row['tokens_per_s'])}, {row['peak_rss_bytes'] / 2**30:.2f} GiB", c)
            for key, row in learner.items() if key.startswith("size_")]
    for strategy in ("ddp", "fsdp"):
        if f"speedup_D2_{strategy}_over_D1" in learner:
            rows.append((f"learner D=2 {strategy} ÷ D=1 tokens/s (params per rank)",
                         f"{learner[f'speedup_D2_{strategy}_over_D1']:.2f}× "
                         f"({learner[f'parameters_per_rank_D2_{strategy}_over_D1']:.2f}×)", c))
    return rows


def _reward_rows(reward: dict) -> list[Row]:
    c = command("reward_throughput")
    return [(f"reward model tokens/s, {key.replace('_', ' ')}", fmt(row["tokens_per_s"]), c)
            for key, row in reward.items() if key.startswith("micro_batch_")]


def table(results: dict[str, dict | None]) -> str:
    """The markdown summary: one row per number, each with the command that measured it."""
    makers = {"e2e_grpo": _e2e_rows, "disaggregated": _disaggregated_rows, "weight_push": _push_rows, "learner_throughput": _learner_rows,
              "reward_throughput": _reward_rows}
    rows: list[Row] = []
    for name, result in results.items():
        if not result:
            continue
        rows += _rollout_rows(name, result) if name.startswith("rollout_") else makers[name](result)
    lines = ["| measurement | value | command |", "|---|---|---|"]
    lines += [f"| {m} | {v} | `{c}` |" for m, v, c in rows]
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def moving_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    return [_mean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def step_shares(breakdown: dict[str, float]) -> dict[str, float]:
    """The sequential phases of a step as fractions of it (they add up to 1)."""
    phases = {k: breakdown[k] for k in ("generate", "score", "train", "push", "other")}
    total = sum(phases.values())
    return {k: v / total for k, v in phases.items()}


def plots(results: dict[str, dict | None]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    e2e = results.get("e2e_grpo")
    if e2e:
        b = e2e["step_breakdown_seconds"]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.5), gridspec_kw={"height_ratios": [1, 1]})
        left = 0.0
        for phase, color in zip(("generate", "score", "train", "push", "other"),
                                ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8c8c8c"), strict=True):
            top.barh(0, b[phase], left=left, color=color, label=f"{phase} {b[phase]:.3f} s")
            left += b[phase]
        top.barh(1, e2e["trl_seconds_per_step"], color="#937860", label=f"TRL step {e2e['trl_seconds_per_step']:.3f} s")
        top.set_yticks([0, 1], ["rlfleet", "TRL"])
        top.set_xlabel("seconds per step (median)")
        top.legend(fontsize=7, ncol=3, loc="upper right")
        names = [k for k in ("reward", "reference", "old_logprobs") if k in b]
        bottom.barh(range(len(names)), [b[k] for k in names], color="#dd8452")
        bottom.set_yticks(range(len(names)), names)
        bottom.set_xlabel("latency inside `score` (the three calls run at once), s")
        fig.suptitle("GRPO step breakdown (tiny model, 2 CPU cores)")
        fig.tight_layout()
        written.append(_save(fig, "step_breakdown.png"))

        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key, label, color in (("reward_rlfleet", "rlfleet", "#4c72b0"), ("reward_trl", "TRL GRPOTrainer", "#dd8452")):
            curve = e2e[key]
            steps = range(1, len(curve) + 1)
            ax.plot(steps, curve, color=color, alpha=0.35, linewidth=1)
            ax.plot(steps, moving_mean(curve, 5), color=color, linewidth=2, label=f"{label} (mean of 5 steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward (exact answer)")
        ax.set_ylim(0, 1)
        ax.set_title(f"GRPO on `reverse` (seeded: each tool's {e2e['setup']['rounds']} runs agree)")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, "reward_curves.png"))

    roll, learner = results.get("rollout_throughput"), results.get("learner_throughput")
    if roll or learner:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        if roll:
            pairs = sorted((int(k.split("_")[-2]), v["tokens_per_s"]) for k, v in roll.items()
                           if k.endswith("_workers") and isinstance(v, dict))
            axes[0].plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o")
            axes[0].set_xticks([p[0] for p in pairs])
            axes[0].set_ylim(bottom=0)
            axes[0].set_xlabel("vLLM rollout workers")
            axes[0].set_ylabel("tokens/s")
            axes[0].set_title("rollout")
        if learner and "D=1" in learner:
            names = [k for k in ("D=1", "D=2 ddp", "D=2 fsdp") if k in learner]
            axes[1].bar(names, [learner[k]["tokens_per_s"] for k in names], color="#55a868")
            axes[1].set_ylabel("tokens/s")
            axes[1].set_title("learner (data parallel)")
        fig.suptitle("throughput against workers (2 CPU cores)")
        fig.tight_layout()
        written.append(_save(fig, "throughput_vs_workers.png"))
    return written


def _save(fig, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = RESULTS / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--report", action="store_true", help="only rewrite the table and plots")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    seconds, failed = ({}, []) if args.report else run(names)
    results = {name: load(name) for name in BENCHMARKS}
    summary = "# rlfleet benchmarks\n\n" + table(results)
    if seconds:
        summary += "\nWall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        summary += f"; all {(time.perf_counter() - began) / 60:.1f} min.\n"
    (RESULTS / "summary.md").write_text(summary)
    written = plots(results)
    print(summary)  # noqa: T201
    print("wrote", RESULTS / "summary.md", *written)  # noqa: T201
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their output is above)")


if __name__ == "__main__":
    main()

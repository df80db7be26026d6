"""Disaggregated, as on a cluster: the rollout fleet on one core, the learner side (learner,
reward, reference) on the other, synchronous against overlapped (`rollout.max_staleness: 1`).

On a cluster rollout and training run on separate GPUs; here each side is pinned to its own
core (`cluster.<role>.cores`, one thread each), so neither can borrow the other's compute
and the synchronous loop leaves each side idle while the other works. Both modes run the same
GRPO config on `char_fraction` from the tiny model's seed (a task it learns in these steps:
the reward goes from ~0.01 towards 1), with answers long enough that generation weighs about
as much as the learner side's work; they alternate sync / async, async / sync.

Reported: trained samples per second (steps after the first, startup excluded), the ratio
async ÷ sync, each role's busy fraction (the engines' generate time, the reference's latency,
the learner's train time, each ÷ the wall time of the steps) and the reward curves.

    .venv/bin/python bench/disaggregated.py [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_grpo import RESULTS, SETTINGS, run_rlfleet  # noqa: E402

PINNED = {"rollout": {"cores": [0], "threads": 1},
          **{role: {"cores": [1], "threads": 1} for role in ("learner", "reward", "reference")}}
"""The fleet on core 0; the learner, the reward service and the reference actor on core 1."""
DISAGGREGATED = {**SETTINGS, "samples_per_prompt": 4, "max_response_tokens": 48, "lr": 3e-3}
"""GRPO on `char_fraction` from the tiny model's seed (a task it learns within these steps),
with answers long enough that generation weighs about as much as the learner side's work."""
MODES = {"sync": 0, "async": 1}


def busy(run: dict) -> dict[str, float]:
    """Each role's busy share of the wall time of the steps after the first."""
    t = {k.removeprefix("timing/"): v[1:] for k, v in run["timing"].items()}
    wall = sum(t["step"])
    total = lambda key: sum(v for v in t.get(key, []) if v is not None)  # noqa: E731
    return {"fleet": total("generate_busy") / wall, "reference": total("reference") / wall,
            "learner": total("train") / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "disaggregated.json"))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 cores to pin the fleet and the learner side apart")
    batch = DISAGGREGATED["prompts_per_step"] * DISAGGREGATED["samples_per_prompt"]
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.rounds):
            for mode in (list(MODES) if r % 2 == 0 else list(reversed(MODES))):
                run = run_rlfleet(None, args.steps, tmp / f"{mode}_{r}", cluster=PINNED, settings=DISAGGREGATED,
                                  task="char_fraction", max_staleness=MODES[mode])
                run["samples_per_s"] = batch * (len(run["step_seconds"]) - 1) / sum(run["step_seconds"][1:])
                run["busy"] = busy(run)
                runs[mode].append(run)
                print(f"round {r + 1} {mode}: {run['samples_per_s']:.1f} samples/s, busy "  # noqa: T201
                      + ", ".join(f"{k} {v:.0%}" for k, v in run["busy"].items())
                      + f", reward {run['reward'][0]:.2f} → {run['reward'][-1]:.2f}", flush=True)
    result = {
        "setup": {**DISAGGREGATED, "steps": args.steps, "rounds": args.rounds, "pinned": PINNED},
        **{f"{mode}_samples_per_s": statistics.fmean(r["samples_per_s"] for r in runs[mode]) for mode in MODES},
        **{f"{mode}_busy": {k: statistics.fmean(r["busy"][k] for r in runs[mode]) for k in runs[mode][0]["busy"]}
           for mode in MODES},
        **{f"{mode}_reward_last5": statistics.fmean(x for r in runs[mode] for x in r["reward"][-5:]) for mode in MODES},
        **{f"{mode}_reward_first": statistics.fmean(r["reward"][0] for r in runs[mode]) for mode in MODES},
        "runs": runs,
    }
    result["ratio_async_over_sync"] = result["async_samples_per_s"] / result["sync_samples_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()

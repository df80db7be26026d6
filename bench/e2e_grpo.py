"""End-to-end GRPO: rlfleet against TRL's `GRPOTrainer`, same model, task, reward and batch.

Both start from one SFT warm start of the tiny character-level model on the built-in
`reverse` task (the demo's first stage) and train with GRPO for `--steps` steps: the same
prompts per step, samples per prompt, response length, learning rate (constant, AdamW),
clip range, k3 KL in the loss with the same β, token-mean loss, one optimizer step per RL step,
and the same reward function (rlfleet's `exact_match`, loaded from its source file by the TRL
side). With one update per batch neither makes a separate old-log-prob pass (rlfleet's
`reuses_update_logprobs`, TRL's single-iteration path). They differ where the tools differ:
rlfleet generates with vLLM in a Ray actor and scores, references and trains in other actors,
one CPU each; TRL generates with transformers' `generate` and does everything in one process
with all the cores' threads (TRL's vLLM path needs a GPU build of vLLM).

TRL runs in its own environment, bench/.trl-env (created on first use, torch and
transformers at the versions rlfleet runs with; TRL pinned below): it is never a dependency
of rlfleet. The runs alternate, rlfleet then TRL, then TRL then rlfleet (`--rounds` 2), so
drift of the machine hits both alike. Seconds per step are the median over the steps after
the first (the first pays one-time warm-ups) of all rounds; startup is reported apart.

Writes bench/results/e2e_grpo.json: seconds per step for both, the ratio, startup seconds,
the reward curves, and rlfleet's step breakdown (`timing/*`).

    .venv/bin/python bench/e2e_grpo.py [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
TRL_ENV = BENCH / ".trl-env"
TRL_VERSION = "1.16.0"

# The shared settings (the demo's GRPO, with one optimizer step per RL step).
SETTINGS = {
    "prompts_per_step": 16,
    "samples_per_prompt": 8,
    "max_response_tokens": 8,
    "lr": 5e-4,
    "kl_coef": 0.01,
    "temperature": 1.0,
    "seed": 0,
}
SFT = {"steps": 125, "lr": 3e-3}
TASK_SIZE = 2000


def trl_python() -> Path:
    """bench/.trl-env's interpreter; the environment is made (about a minute) when missing."""
    python = TRL_ENV / "bin" / "python"
    if python.exists():
        return python
    import torch
    import transformers

    torch_version = torch.__version__.split("+")[0]
    print(f"creating {TRL_ENV} (trl=={TRL_VERSION}, torch=={torch_version}, "  # noqa: T201
          f"transformers=={transformers.__version__})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_ENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", f"torch=={torch_version}",
                    f"transformers=={transformers.__version__}"], check=True)
    return python


def warm_start(root: Path) -> str:
    """The demo's SFT stage on `reverse`: a model that half-knows the task."""
    from rlfleet.common.config import RunConfig
    from rlfleet.deploy.app.stages import run_stage

    cfg = RunConfig.model_validate({"seed": 0, "data": {"task": "reverse", "task_size": TASK_SIZE},
                                    "sft": SFT, "logging": {"run_dir": str(root), "progress_bar": False}})
    return run_stage(cfg, "sft")["output"]


def write_rows(path: Path) -> Path:
    """The training prompts rlfleet draws from, for TRL: {prompt: [messages], answer}."""
    from rlfleet.common.tasks import build_task

    rows = build_task("reverse", SETTINGS["seed"], TASK_SIZE).rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_rlfleet(model: str, steps: int, run_dir: Path, cluster: dict | None = None,
                settings: dict | None = None, task: str = "reverse", max_staleness: int = 0) -> dict:
    """One rlfleet GRPO run of `steps` steps with `settings` (default SETTINGS) on `task`;
    `cluster` overrides the cluster section (e.g. {'learner': {'threads': 1}});
    `max_staleness` >= 1: the overlapped loop."""
    from rlfleet.common.config import RunConfig
    from rlfleet.common.metrics import read_metrics
    from rlfleet.deploy.app.trainer import Trainer

    s = settings or SETTINGS
    cfg = RunConfig.model_validate({
        "seed": s["seed"],
        "total_steps": steps,
        "model": {"path": model},
        "data": {"task": task, "task_size": TASK_SIZE},
        "rollout": {"prompts_per_step": s["prompts_per_step"], "samples_per_prompt": s["samples_per_prompt"],
                    "max_response_tokens": s["max_response_tokens"], "temperature": s["temperature"],
                    "max_staleness": max_staleness},
        "learner": {"lr": s["lr"], "minibatch_size": s["prompts_per_step"] * s["samples_per_prompt"]},
        "algorithm": {"advantage_estimator": "grpo", "kl_in": "loss", "kl_estimator": "k3", "kl_coef": s["kl_coef"],
                      "loss_agg": "token-mean"},
        "logging": {"run_dir": str(run_dir), "progress_bar": False},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "cluster": cluster or {},
    })
    began = time.perf_counter()
    Trainer(cfg).fit()
    total = time.perf_counter() - began
    rows = [r for r in read_metrics(run_dir) if r["step"] > 0]
    step_seconds = [r["timing/step"] for r in rows]
    return {
        "startup_seconds": total - sum(step_seconds),
        "step_seconds": step_seconds,
        "reward": [r["reward"] for r in rows],
        "kl": [r["objective/kl"] for r in rows],
        "total_seconds": total,
        "timing": {k: [r.get(k) for r in rows] for k in sorted(rows[0]) if k.startswith("timing/")},
    }


ONE_THREAD = {role: {"threads": 1} for role in ("rollout", "learner", "reward", "reference")}
"""The cluster section that reproduces rlfleet before the thread budget: one thread per actor."""


def run_trl(python: Path, model: str, data: Path, steps: int, tmp: Path, settings_: dict | None = None,
            rule: str = "exact_match", bf16: bool = False) -> dict:
    """TRL's GRPOTrainer in bench/.trl-env (`bf16`: TRL's `bf16=True` on CPU)."""
    settings = tmp / "trl_settings.json"
    out = tmp / "trl_out.json"
    settings.write_text(json.dumps({**(settings_ or SETTINGS), "model": model, "data": str(data), "steps": steps,
                                    "rule": rule, "bf16": bf16}))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    began = time.perf_counter()
    log = tmp / "trl.log"  # TRL prints every step's logs: kept out of the report, shown on failure
    with log.open("w") as sink:
        done = subprocess.run([str(python), str(BENCH / "trl_grpo.py"), str(settings), str(out)], env=env,
                              stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"the TRL run failed (exit {done.returncode}):\n{log.read_text()[-4000:]}")
    result = json.loads(out.read_text())
    result["total_seconds"] = time.perf_counter() - began  # the interpreter's start and imports included
    result["startup_seconds"] = result["total_seconds"] - sum(result["step_seconds"])
    return result


def steady(runs: list[dict]) -> float:
    """Median seconds per step over every step after the first of each run."""
    return statistics.median(s for run in runs for s in run["step_seconds"][1:])


def mean_curve(runs: list[dict], key: str) -> list[float]:
    return [statistics.fmean(values) for values in zip(*(run[key] for run in runs), strict=True)]


def breakdown(runs: list[dict]) -> dict[str, float]:
    """rlfleet's median seconds per phase over the steps after the first; `other` is the rest
    of each step (the driver's own work: sampling prompts, metrics)."""
    phases = ("generate", "score", "train", "push")
    steps = [{k.removeprefix("timing/"): v[i] for k, v in run["timing"].items() if v[i] is not None}
             for run in runs for i in range(1, len(run["step_seconds"]))]
    for s in steps:
        s["other"] = max(s["step"] - sum(s[p] for p in phases), 0.0)
    keys = ("step", *phases, "other", "reward", "reference", "old_logprobs")
    return {k: statistics.median(s[k] for s in steps) for k in keys if k in steps[0]}


def plot_wallclock(runs: dict[str, list[dict]], path: Path) -> None:
    """Mean reward per step against seconds of training (startup excluded), one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, contender in runs.items():
        clock = [statistics.fmean(t) for t in zip(*(_cumulative(r["step_seconds"]) for r in contender), strict=True)]
        ax.plot(clock, mean_curve(contender, "reward"), marker=".", label=f"{name} ({steady(contender):.2f} s/step)")
    ax.set_xlabel("seconds of training (startup excluded)")
    ax.set_ylabel("mean training reward")
    ax.set_title("GRPO on reverse, tiny model, 2 CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cumulative(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one-thread", action="store_true",
                        help="also run rlfleet with one thread per actor (as before the thread budget)")
    parser.add_argument("--out", default=str(RESULTS / "e2e_grpo.json"))
    args = parser.parse_args()

    python = trl_python()
    runs: dict[str, list[dict]] = {"rlfleet": [], "rlfleet_async": [], "trl": [],
                                   **({"rlfleet_1thread": []} if args.one_thread else {})}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = warm_start(tmp / "sft")
        data = write_rows(tmp / "reverse.jsonl")
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                if name == "rlfleet":
                    run = run_rlfleet(model, args.steps, tmp / f"rlfleet_{r}")
                elif name == "rlfleet_async":
                    run = run_rlfleet(model, args.steps, tmp / f"rlfleet_async_{r}", max_staleness=1)
                elif name == "rlfleet_1thread":
                    run = run_rlfleet(model, args.steps, tmp / f"rlfleet_1thread_{r}", cluster=ONE_THREAD)
                else:
                    run = run_trl(python, model, data, args.steps, tmp)
                runs[name].append(run)
                print(f"round {r + 1} {name}: {statistics.median(run['step_seconds'][1:]):.3f} s/step, "  # noqa: T201
                      f"startup {run['startup_seconds']:.1f} s, reward {run['reward'][0]:.2f} → "
                      f"{run['reward'][-1]:.2f}", flush=True)
    result = {
        "setup": {**SETTINGS, "steps": args.steps, "rounds": args.rounds, "sft": SFT, "trl": TRL_VERSION,
                  "cpus": os.cpu_count(), "trl_threads": runs["trl"][0]["threads"]},
        "rlfleet_seconds_per_step": steady(runs["rlfleet"]),
        "rlfleet_async_seconds_per_step": steady(runs["rlfleet_async"]),
        "trl_seconds_per_step": steady(runs["trl"]),
        "rlfleet_startup_seconds": statistics.median(r["startup_seconds"] for r in runs["rlfleet"]),
        "trl_startup_seconds": statistics.median(r["startup_seconds"] for r in runs["trl"]),
        "reward_rlfleet": mean_curve(runs["rlfleet"], "reward"),
        "reward_rlfleet_async": mean_curve(runs["rlfleet_async"], "reward"),
        "reward_trl": mean_curve(runs["trl"], "reward"),
        "step_breakdown_seconds": breakdown(runs["rlfleet"]),
        "step_breakdown_seconds_async": breakdown(runs["rlfleet_async"]),
        "runs": runs,
    }
    result["ratio_trl_over_rlfleet_seconds_per_step"] = result["trl_seconds_per_step"] / result["rlfleet_seconds_per_step"]
    result["ratio_async_over_trl_seconds_per_step"] = (result["rlfleet_async_seconds_per_step"]
                                                       / result["trl_seconds_per_step"])
    last5 = lambda curve: statistics.fmean(curve[-5:])  # noqa: E731
    result["reward_last5"] = {name: last5(result[f"reward_{name}"]) for name in ("rlfleet", "rlfleet_async", "trl")}
    if args.one_thread:
        result["rlfleet_1thread_seconds_per_step"] = steady(runs["rlfleet_1thread"])
        result["step_breakdown_seconds_1thread"] = breakdown(runs["rlfleet_1thread"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot_wallclock(runs, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k.endswith(("per_step", "seconds"))}, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()

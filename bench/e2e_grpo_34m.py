"""End-to-end GRPO at a realistic CPU size: rlfleet against TRL's `GRPOTrainer` on a ~34M
Llama (the character tokenizer, hidden 512, 8 layers, 8 heads, MLP 2048), fresh from its seed.

The setting: the built-in `char_fraction` task (the reward is the fraction of the response that
is the letter asked for), 16 prompts × 4 samples, up to 128 response tokens, temperature 1, k3
KL to the frozen start in the loss (β 0.01), token-mean loss, one optimizer step per RL step,
the same reward function on both sides (rlfleet's `char_fraction`). The contenders:

- `rlfleet`: its defaults (the thread budget: every actor may use the node's cores in its phase);
- `rlfleet_1thread` (`--one-thread`): one thread per actor, rlfleet before the thread budget;
- `trl`: TRL fp32 (all the machine's threads);
- `trl_bf16`: TRL with `bf16=True` — run only where the CPU has bf16 matrix units (AMX or
  AVX-512 BF16), or with `--force-bf16`. Elsewhere bf16 is emulated; the script then measures
  one forward + backward of this model in bf16 autocast against fp32 and reports the ratio
  instead of spending hours on a TRL run nobody would choose.

Runs alternate (contender order reversed every other round). Seconds per step: the median over
steps 2.. of every round. Writes bench/results/e2e_grpo_34m.json with the breakdown of rlfleet's
step (`timing/*`), the reward curves, and the machine.

    .venv/bin/python bench/e2e_grpo_34m.py [--steps 8] [--rounds 1] [--one-thread] [--force-bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from e2e_grpo import ONE_THREAD, RESULTS, breakdown, run_rlfleet, run_trl, steady, trl_python

SETTINGS = {
    "prompts_per_step": 16,
    "samples_per_prompt": 4,
    "max_response_tokens": 128,
    "lr": 1e-4,
    "kl_coef": 0.01,
    "temperature": 1.0,
    "seed": 0,
}
SHAPE = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048}
TASK, RULE, TASK_SIZE = "char_fraction", "char_fraction", 2000


def build_model(root: Path) -> str:
    from rlfleet.common.config import TinyModelConfig
    from rlfleet.common.tiny_models import build_tiny_causal_lm

    return str(build_tiny_causal_lm(root / "model34m", seed=SETTINGS["seed"], shape=TinyModelConfig(**SHAPE)))


def write_rows(path: Path) -> Path:
    from rlfleet.common.tasks import build_task

    rows = build_task(TASK, SETTINGS["seed"], TASK_SIZE).rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bf16_probe(model: str) -> dict[str, float]:
    """One forward + backward of the model on 4 × 144 tokens, fp32 against bf16 autocast, on
    all cores: how much bf16 costs where the CPU emulates it."""
    import torch
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    x = torch.randint(4, 100, (4, 144), generator=torch.Generator().manual_seed(0))
    seconds = {}
    for name in ("float32", "bfloat16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bfloat16"):
            net(x[:1, :16]).logits.float().mean().backward()  # warm-up
            began = time.perf_counter()
            net(x).logits.float().log_softmax(-1).mean().backward()
        seconds[name] = time.perf_counter() - began
    return {"fwd_bwd_seconds_float32": seconds["float32"], "fwd_bwd_seconds_bfloat16": seconds["bfloat16"],
            "bf16_over_fp32": seconds["bfloat16"] / seconds["float32"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--one-thread", action="store_true", help="also run rlfleet with one thread per actor")
    parser.add_argument("--force-bf16", action="store_true", help="run TRL bf16 even without bf16 matrix units")
    parser.add_argument("--out", default=str(RESULTS / "e2e_grpo_34m.json"))
    args = parser.parse_args()

    from rlfleet.common.machine import cpu_has_bf16_units, describe_machine

    python = trl_python()
    bf16 = cpu_has_bf16_units() or args.force_bf16
    names = ["rlfleet", "trl"] + (["trl_bf16"] if bf16 else []) + (["rlfleet_1thread"] if args.one_thread else [])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    probe = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = build_model(tmp)
        data = write_rows(tmp / "char_fraction.jsonl")
        if not bf16:
            probe = bf16_probe(model)
            print(f"no bf16 matrix units: TRL bf16 skipped; bf16 autocast fwd+bwd takes "  # noqa: T201
                  f"{probe['bf16_over_fp32']:.1f}× fp32's time here", flush=True)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else list(reversed(names)):
                if name.startswith("rlfleet"):
                    cluster = ONE_THREAD if name == "rlfleet_1thread" else None
                    run = run_rlfleet(model, args.steps, tmp / f"{name}_{r}", cluster, SETTINGS, TASK)
                else:
                    run = run_trl(python, model, data, args.steps, tmp, SETTINGS, RULE, bf16=name == "trl_bf16")
                runs[name].append(run)
                print(f"round {r + 1} {name}: {statistics.median(run['step_seconds'][1:]):.2f} s/step, "  # noqa: T201
                      f"reward {run['reward'][0]:.3f} → {run['reward'][-1]:.3f}", flush=True)
    result = {
        "setup": {**SETTINGS, **SHAPE, "task": TASK, "steps": args.steps, "rounds": args.rounds,
                  "machine": describe_machine()},
        "seconds_per_step": {n: steady(rs) for n, rs in runs.items()},
        "last3_reward": {n: statistics.fmean(x for run in rs for x in run["reward"][-3:]) for n, rs in runs.items()},
        "rlfleet_breakdown_seconds": breakdown(runs["rlfleet"]),
        "bf16_probe": probe,
        "runs": runs,
    }
    per_step = result["seconds_per_step"]
    result["rlfleet_over_trl"] = per_step["rlfleet"] / per_step["trl"]
    if "trl_bf16" in per_step:
        result["rlfleet_over_trl_bf16"] = per_step["rlfleet"] / per_step["trl_bf16"]
    if "rlfleet_1thread" in per_step:
        result["rlfleet_1thread_breakdown_seconds"] = breakdown(runs["rlfleet_1thread"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("runs", "setup")}
    print(json.dumps(summary, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()

"""`rlfleet demo --agent`: a tiny model learns to use a calculator tool, on a laptop CPU.

1. Build the tiny model with the BPE tokenizer (role and tool-call tokens; no download).
2. SFT on synthetic traces of the `calculator` task, built token-exactly as the rollout
   workers build episodes. 40 % use the tool: the question, a tool call with the product to
   compute, the tool's answer (an observation: not imitated), the final answer. 60 % answer in
   the head ("the answer is 4042"): the right product, which a 2-layer model cannot compute.
   So the model leaves SFT knowing both ways and preferring the one that fails (greedy: "the
   answer is …" comes first), and calling the tool in about 4 samples of 10.
3. GRPO against the `calculator` environment (its tool runs in a sandbox process): only the
   right final answer is rewarded, and RL has to find that the tool is what pays. Held-out
   success (the environment's own check of the final answer, greedy, on questions never
   trained on) before RL and every few steps, with turns per episode and the tool-error rate.
4. Write `report.png` and print the before/after numbers.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from rlfleet.common.chat import observation_ids, prompt_ids, turn_closing
from rlfleet.common.config import RunConfig
from rlfleet.common.config_io import dump_config
from rlfleet.common.machine import describe_machine, machine_line
from rlfleet.common.metrics import read_metrics
from rlfleet.common.tasks import build_task
from rlfleet.deploy.app.inputs import policy_path
from rlfleet.deploy.app.report import AGENT_PANELS, write_report
from rlfleet.deploy.app.stages import stage_settings
from rlfleet.deploy.app.trainer import Trainer
from rlfleet.learner.supervised import Demonstration, sft
from rlfleet.services.sandbox import import_path
from rlfleet.services.tools import tool_schema

AGENT_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "total_steps": 80,
    "model": {"tiny": {"tokenizer": "bpe"}},
    "data": {"task": "calculator", "task_size": 4096, "eval_size": 100},
    "environment": {"path": "calculator", "max_turns": 3, "max_episode_tokens": 96},
    "rollout": {"prompts_per_step": 32, "samples_per_prompt": 8, "max_response_tokens": 40},
    "learner": {"lr": 5e-4, "minibatch_size": 128},
    "algorithm": {"advantage_estimator": "grpo", "kl_in": "none"},
    "sft": {"steps": 1200, "lr": 1e-3, "batch_size": 16, "lr_schedule": "cosine"},
    "logging": {"run_dir": "runs/demo_agent", "eval_every_steps": 20, "progress_bar": False},
    "checkpoint": {"every_steps": 0, "resume": "never"},
}


IN_THE_HEAD = 0.6
"""The fraction of SFT traces that answer without the tool."""


def calculator_traces(rows: list[dict[str, Any]], tokenizer, tools: list[dict[str, Any]], in_the_head: float = 0.0,
                      seed: int = 0) -> list[Demonstration]:
    """One right episode per row: call the calculator with the question's product, then answer
    with its result (the observation tokens get loss mask 0); or, for a fraction `in_the_head`
    of the rows (drawn with `seed`), answer at once: "the answer is <product>"."""
    closing, eos = turn_closing(tokenizer), [tokenizer.eos_token_id]
    draw = random.Random(f"in-the-head:{seed}")
    out = []
    for row in rows:
        prompt = prompt_ids(tokenizer, [{"role": "user", "content": row["question"]}], tools)
        if draw.random() < in_the_head:
            said = tokenizer.encode(f"the answer is {row['answer']}", add_special_tokens=False) + eos
            out.append(Demonstration(prompt, said, [1] * len(said)))
            continue
        expression = row["question"].removeprefix('what is "').removesuffix('"?')
        call = f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'
        first = tokenizer.encode(call, add_special_tokens=False) + eos
        observation = observation_ids(tokenizer, [{"role": "tool", "content": row["answer"]}], closing)
        final = tokenizer.encode(row["answer"], add_special_tokens=False) + eos
        out.append(Demonstration(prompt, first + observation + final, [1] * len(first) + [0] * len(observation) + [1] * len(final)))
    return out


def run_agent_demo(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    root = Path(cfg.logging.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(dump_config(cfg))
    base = policy_path(cfg, root)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tools = [tool_schema(import_path(p)) for p in cfg.environment.tool_paths]
    train = calculator_traces(build_task("calculator", cfg.seed, cfg.data.task_size).rows, tokenizer, tools,
                              IN_THE_HEAD, cfg.seed)
    test = calculator_traces(build_task("calculator", cfg.seed, 64, "test").rows, tokenizer, tools,
                             IN_THE_HEAD, cfg.seed + 1)
    sc = cfg.sft
    sft_out = root / "models" / "sft"
    sft_result = sft(base, sft_out, train, test, stage_settings(sc, cfg.seed))
    grpo_cfg = RunConfig.model_validate({**cfg.model_dump(mode="python"), "model": {"path": str(sft_out)},
                                         "logging": {**cfg.logging.model_dump(), "run_dir": str(root / "grpo")}})
    (root / "grpo").mkdir(parents=True, exist_ok=True)
    (root / "grpo" / "config.yaml").write_text(dump_config(grpo_cfg))
    fit = Trainer(grpo_cfg).fit()
    evals = [r for r in read_metrics(root / "grpo") if r.get("eval/gold") is not None]
    first, last = evals[0], evals[-1]
    report = write_report({"GRPO (calculator tool)": root / "grpo"}, root / "report.png",
                          title="rlfleet demo --agent: learn to use a calculator tool", panels=AGENT_PANELS)
    return {"run_dir": str(root), "machine": describe_machine(), "sft": sft_result,
            "before": {k: first.get(k) for k in ("eval/gold", "eval/turns", "eval/tool_error_rate")},
            "after": {k: last.get(k) for k in ("eval/gold", "eval/turns", "eval/tool_error_rate")},
            "last_step": last["step"], "checkpoint": fit["checkpoint"], "report": str(report),
            "seconds": time.perf_counter() - started}


def print_agent_summary(s: dict[str, Any]) -> None:
    out = sys.stdout
    b, a = s["before"], s["after"]
    out.write(f"\nrlfleet demo --agent finished in {s['seconds'] / 60:.1f} min; run folder {s['run_dir']}\n")
    out.write(f"  measured on {machine_line(s['machine'])}\n")
    out.write(f"  SFT warm start on synthetic tool-use traces: held-out token accuracy "
              f"{s['sft']['after/token_accuracy']:.0%}\n")
    out.write("  held-out episodes (greedy):        success | turns per episode | tool-call error rate\n")
    out.write(f"    after SFT (step 0)              {b['eval/gold']:7.0%} | {b['eval/turns']:17.2f} | "
              f"{b['eval/tool_error_rate']:.0%}\n")
    out.write(f"    after GRPO (step {s['last_step']:<4})          {a['eval/gold']:7.0%} | {a['eval/turns']:17.2f} | "
              f"{a['eval/tool_error_rate']:.0%}\n")
    out.write(f"  report: {s['report']}\n")

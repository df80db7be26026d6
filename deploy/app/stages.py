"""`rlfleet sft | rm | dpo`: the supervised stages, from a config's `sft` / `rm` / `dpo` section.

Data is a JSONL file (`<stage>.data_path`: {prompt, response} rows for SFT, {prompt, chosen,
rejected} rows for the reward model and DPO; the last `eval_size` rows are held out), or is
derived from the built-in `data.task`: its correct answers are the demonstrations and the
chosen responses, a near miss is the rejected one (`<stage>.negatives`: swapped, one wrong,
reordered, one too many or too few, every character redrawn, or `sampled`: a wrong answer
sampled from `<stage>.sample_from` (default: the starting model); accuracy is reported per kind),
and its fixed test split is held out. A JSONL row may name its own `kind`.
Per-step numbers go to `run_dir/<stage>/metrics.jsonl`. SFT and DPO also report the held-out
generation accuracy by the run's gold checker before and after (`before/gold`, `after/gold`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Literal

from transformers import AutoTokenizer

from rlfleet.common.config import RunConfig, StageConfig
from rlfleet.common.data import DataError, read_rows, render_prompt
from rlfleet.common.metrics import MetricsWriter
from rlfleet.common.tasks import build_task, wrong_answer
from rlfleet.deploy.app.gold import generation_gold
from rlfleet.deploy.app.inputs import policy_path
from rlfleet.deploy.app.negatives import sampled_negatives
from rlfleet.deploy.app.preflight import check_inputs
from rlfleet.learner.supervised import (
    Demonstration,
    PreferencePair,
    StageSettings,
    dpo,
    sft,
    train_reward_model,
)

Stage = Literal["sft", "rm", "dpo"]



def stage_settings(sc: StageConfig, seed: int) -> StageSettings:
    """How a supervised stage trains, from its config section."""
    return StageSettings(sc.steps, sc.lr, sc.batch_size, seed, eval_every=sc.eval_every,
                         schedule=sc.lr_schedule, warmup_steps=sc.warmup_steps)

def _rows(cfg: RunConfig, stage: Stage, sc: StageConfig,
          start: str | None = None) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(train, held-out) rows with text fields prompt / response / chosen / rejected; `sampled`
    negatives come from `sc.sample_from`, else from `start` (the model the stage starts from)."""
    if sc.data_path is not None:
        rows = read_rows(sc.data_path)
        if len(rows) <= sc.eval_size:
            raise DataError(f"{sc.data_path}: {len(rows)} rows leave none to train on after "
                            f"{stage}.eval_size={sc.eval_size} held-out rows")
        return rows[: -sc.eval_size], rows[-sc.eval_size :]
    task = cfg.data.task
    train = build_task(task, cfg.seed, cfg.data.task_size, "train").rows
    test = build_task(task, cfg.seed, sc.eval_size, "test").rows
    if "answer" not in train[0]:
        raise DataError(f"data.task={task!r} has no reference answers to imitate or rank; "
                        f"set {stage}.data_path to a JSONL file")
    rng = random.Random(cfg.seed)
    kinds = sc.negatives if stage != "sft" else ["random"]

    def derive(rows: list[dict], split: str) -> list[tuple[str, dict]]:
        wanted, source = kinds.count("sampled"), sc.sample_from or start
        if wanted and source is None:
            raise ValueError(f"{stage}.negatives asks for 'sampled' but no model to sample from was given")
        sampled = sampled_negatives(cfg, source, rows, wanted, rng, split) if wanted else [[] for _ in rows]
        out = []
        for i, (r, own) in enumerate(zip(rows, sampled, strict=True)):
            answer = str(r["answer"])
            drawn = [(wrong_answer(answer, rng, k), k) for k in kinds if k != "sampled"] + own
            for rejected, kind in drawn:  # one pair per kind: near misses and easy ones side by side
                out.append((f"task {task} {split} #{i}",
                            {"prompt": r["prompt"], "response": answer, "chosen": answer,
                             "rejected": rejected, "kind": kind}))
        return out

    return derive(train, "train"), derive(test, "test")


def _field(where: str, row: dict, key: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: no '{key}' field; fields: {sorted(row)}")
    return row[key]


def _examples(rows, stage: Stage, tokenizer) -> list[Demonstration] | list[PreferencePair]:
    eos = [tokenizer.eos_token_id]

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(str(text), add_special_tokens=False)) + eos

    out = []
    for where, row in rows:
        prompt = render_prompt(_field(where, row, "prompt"), tokenizer)
        if stage == "sft":
            out.append(Demonstration(prompt, encode(_field(where, row, "response"))))
        else:
            out.append(PreferencePair(prompt, encode(_field(where, row, "chosen")),
                                      encode(_field(where, row, "rejected")), str(row.get("kind", ""))))
    return out


def run_stage(cfg: RunConfig, stage: Stage) -> dict[str, Any]:
    """Train one stage; returns the output folder and the held-out numbers before and after."""
    check_inputs(cfg, stage=stage)
    sc: StageConfig = getattr(cfg, stage)
    run_dir = Path(cfg.logging.run_dir)
    start = sc.init_from or policy_path(cfg, run_dir)
    out = Path(sc.output_dir) if sc.output_dir else run_dir / "models" / stage
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or start)
    train_rows, test_rows = _rows(cfg, stage, sc, start)
    train, test = _examples(train_rows, stage, tokenizer), _examples(test_rows, stage, tokenizer)
    settings = stage_settings(sc, cfg.seed)
    metrics = MetricsWriter(run_dir / stage)
    metrics.truncate_after(0)
    log = lambda row: metrics.write(row["step"], {k: v for k, v in row.items() if k != "step"})  # noqa: E731
    began = time.perf_counter()
    if stage == "sft":
        result = sft(start, out, train, test, settings, log)
    elif stage == "rm":
        result = train_reward_model(start, out, train, test, settings, log, lora_rank=sc.lora_rank,
                                    lm_coef=sc.lm_coef)
    else:
        result = dpo(start, out, train, test, settings, sc.beta, log)
    metrics.close()
    # The gold checker on greedy held-out answers, before and after: for the built-in task the
    # stage trained on, or when the run names one (`data.eval_reward`) for its eval prompts.
    if stage != "rm" and (sc.data_path is None or cfg.data.eval_reward is not None):
        result.update({"before/gold": generation_gold(cfg, start), "after/gold": generation_gold(cfg, out)})
    return {"stage": stage, "output": str(out), "init_from": start, "train_examples": len(train),
            "eval_examples": len(test), "seconds": time.perf_counter() - began, **result}

"""The gold checker outside RL: held-out generation accuracy of a saved model.

The supervised stages (SFT, DPO) report the same number an RL run logs as `eval/gold`:
greedy answers to the first `data.eval_size` held-out prompts, scored by the run's gold
checker (`data.eval_reward`, or a built-in task's own rule). Generation uses the HF rollout
backend in this process (the stages need no Ray), rule functions run in their sandbox
processes as in the reward service.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from rlfleet.common.config import RunConfig
from rlfleet.deploy.app.inputs import gold_rules, load_data
from rlfleet.deploy.loop.stages import sampling_spec
from rlfleet.rollout.hf_worker import HFRolloutWorker
from rlfleet.services.rules import RuleRunner, weighted_rules


def generation_gold(cfg: RunConfig, model_dir: str | Path) -> float | None:
    """Mean gold score of the greedy answers of the causal LM in `model_dir` (None when the
    run has no gold checker or nothing could be scored)."""
    rules = gold_rules(cfg)
    if not rules:
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples = load_data(cfg, tokenizer).eval.examples[: cfg.data.eval_size]
    worker = HFRolloutWorker(str(model_dir), cfg.rollout.model_copy(update={"dtype": "float32"}), cfg.seed)
    rollouts = worker.generate([e.prompt_ids for e in examples], sampling_spec(cfg, 0, greedy=True)).rollouts
    runner = RuleRunner(sorted({r.function for r in rules}), processes=1)
    try:
        scores = weighted_rules(
            runner, rules,
            tokenizer.batch_decode([r.prompt_ids for r in rollouts], skip_special_tokens=True),
            tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True),
            [examples[r.prompt_index].extra for r in rollouts])
    finally:
        runner.close()
    good = [s for s in scores if s is not None]
    return sum(good) / len(good) if good else None

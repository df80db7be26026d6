"""The TRL side of bench/e2e_grpo.py: GRPO with TRL's `GRPOTrainer` on the same model, task,
reward and batch shape as the rlfleet run. It runs in the benchmark's own environment
(bench/.trl-env, made by bench/e2e_grpo.py), where rlfleet is not installed: the reward rule
is loaded from the rlfleet source file itself (services/rules.py imports only the standard
library), so both trainers score with the same function.

    bench/.trl-env/bin/python bench/trl_grpo.py SETTINGS.json OUT.json

SETTINGS.json: {model, data (JSONL of {prompt: [messages], answer}), steps, prompts_per_step,
samples_per_prompt, max_response_tokens, lr, kl_coef, temperature, seed, rule (an rlfleet rule
name, default exact_match), bf16 (TRL's bf16=True: autocast with fp32 weights)}. An RL step is one
generation of prompts_per_step × samples_per_prompt responses and one optimizer step on them
(the rlfleet run uses the same: minibatch_size = the whole batch, ppo_epochs 1).
OUT.json: {step_seconds: [...], reward: [...], kl: [...], threads} (the caller times the whole
process and derives the startup).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

RULES = Path(__file__).resolve().parents[1] / "services" / "rules.py"


def load_rule(name: str):
    spec = importlib.util.spec_from_file_location("rlfleet_rules", RULES)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return getattr(module, name)


EXTRA_COLUMNS = ("answer", "target")
"""Dataset columns TRL hands to the reward function that rlfleet passes in a rule's `extra`."""


def reward_function(rule):
    """TRL's reward signature around an rlfleet rule `fn(prompt, response, extra)`."""

    def reward(prompts, completions, **columns):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        extras = [{k: columns[k][i] for k in EXTRA_COLUMNS if k in columns} for i in range(len(texts))]
        return [rule("", text, extra) for text, extra in zip(texts, extras, strict=True)]

    reward.__name__ = rule.__name__
    return reward


def main() -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    settings = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rows = [json.loads(line) for line in Path(settings["data"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    g = settings["samples_per_prompt"]
    batch = settings["prompts_per_step"] * g

    class StepClock(TrainerCallback):
        """Wall seconds of every step (generation, scoring, reference and the update)."""

        def __init__(self):
            self.seconds: list[float] = []
            self._began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._began)

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp,
            max_steps=settings["steps"],
            per_device_train_batch_size=batch,  # n prompts × g samples, generated and trained in one step
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_generations=g,
            num_iterations=1,
            max_completion_length=settings["max_response_tokens"],
            temperature=settings["temperature"],
            top_p=1.0,
            top_k=0,
            learning_rate=settings["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=settings["kl_coef"],  # k3 KL to a frozen reference, in the loss: rlfleet's kl_in=loss, k3
            epsilon=0.2,
            loss_type="dapo",  # token-mean over the batch: rlfleet's loss_agg=token-mean
            scale_rewards="group",
            use_vllm=False,
            bf16=bool(settings.get("bf16")),
            use_cpu=True,
            seed=settings["seed"],
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            model_init_kwargs={"dtype": torch.float32},
        )
        clock = StepClock()
        trainer = GRPOTrainer(
            model=settings["model"],
            reward_funcs=reward_function(load_rule(settings.get("rule", "exact_match"))),
            args=config,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(settings["model"]),
            callbacks=[clock],
        )
        trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    out.write_text(json.dumps({
        "step_seconds": clock.seconds,
        "reward": [h["reward"] for h in logs],
        "kl": [h.get("kl") for h in logs],
        "threads": torch.get_num_threads(),
    }, indent=1))


if __name__ == "__main__":
    main()

"""`rlfleet demo`: the built-in job. RL visibly improves a model, on a laptop CPU, from nothing.

1. Build the tiny character-level model (no download).
2. SFT warm start on the built-in `reverse` task ("reverse: cab" → "bac"), deliberately short:
   the model half-knows the skill.
3. GRPO with the exact-answer rule reward; held-out accuracy (greedy, 100 test strings never
   trained on) is measured before RL (step 0) and every few steps.
4. With `--rlhf`: train a reward model on (correct, near-miss) answer pairs, the near misses
   including the SFT policy's own wrong answers, then PPO with a critic against it, the KL to
   the reference in the token rewards; its held-out answers are scored by the reward model (the
   proxy) and by the exact-answer rule (the gold), and the best checkpoint by gold is kept.
   The reward model is its own model, twice the policy's depth, trained from scratch with a
   language-model regulariser (README, "The RLHF recipe", has the measurements behind it).
5. Write `report.png` (reward, KL, entropy, length, held-out score over steps) and print the
   before/after numbers.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from rlfleet.common.config import RunConfig
from rlfleet.common.config_io import dump_config
from rlfleet.common.machine import describe_machine, machine_line
from rlfleet.common.metrics import read_metrics
from rlfleet.common.tiny_models import build_tiny_causal_lm
from rlfleet.deploy.app.report import write_report
from rlfleet.deploy.app.stages import run_stage
from rlfleet.deploy.app.trainer import Trainer

logger = logging.getLogger(__name__)

# The demo's defaults; a config file or overrides given to `rlfleet demo` change them.
DEMO_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "total_steps": 80,
    "data": {"task": "reverse", "eval_size": 100},
    "rollout": {"prompts_per_step": 16, "samples_per_prompt": 8, "max_response_tokens": 8},
    "learner": {"lr": 5e-4, "critic_lr": 1e-3, "minibatch_size": 64},
    "algorithm": {"advantage_estimator": "grpo", "kl_in": "loss", "kl_estimator": "k3", "kl_coef": 0.01},
    "sft": {"steps": 125, "lr": 3e-3},
    # near misses, the SFT policy's own wrong answers among them (mostly one wrong letter)
    "rm": {"steps": 1500, "lr": 5e-4, "lr_schedule": "cosine", "warmup_steps": 100, "lm_coef": 1.0,
           "negatives": ["swap", "one_wrong", "one_wrong", "sampled", "shuffle", "length", "random"]},
    "logging": {"run_dir": "runs/demo", "eval_every_steps": 10, "progress_bar": False},
    "checkpoint": {"every_steps": 0, "resume": "never"},
}

# PPO against the learned reward model (measured choices: README, "The RLHF recipe").
PPO_ALGORITHM = {"advantage_estimator": "gae", "kl_in": "reward", "kl_estimator": "k1", "kl_coef": 0.1}
PPO_REWARD: dict[str, Any] = {"normalize": "running"}
PPO_LEARNER: dict[str, Any] = {"critic_init": "reward_model"}
RM_DEPTH = 2
"""The reward model's layers per policy layer, when the demo builds the models itself."""


def _stage_config(cfg: RunConfig, run_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    data = cfg.model_dump(mode="python")
    data["logging"]["run_dir"] = str(run_dir)
    for key, value in sections.items():
        data[key].update(value)
    return RunConfig.model_validate(data)


def _fit(cfg: RunConfig) -> dict[str, Any]:
    """Train an RL stage, its config saved in its folder (`rlfleet train <folder>/config.yaml`
    reruns it, with other settings as overrides)."""
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return Trainer(cfg).fit()


def run_demo(cfg: RunConfig, rlhf: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    root = Path(cfg.logging.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(dump_config(cfg))
    sft = run_stage(cfg, "sft")
    logger.info("SFT (%d steps): held-out token accuracy %.2f → %.2f", cfg.sft.steps,
                sft["before/token_accuracy"], sft["after/token_accuracy"])
    grpo_cfg = _stage_config(cfg, root / "grpo", model={"path": sft["output"]})
    grpo = _fit(grpo_cfg)
    grpo_reward = _window_means(root / "grpo", "reward")
    summary: dict[str, Any] = {
        "run_dir": str(root),
        "machine": describe_machine(),
        "sft": sft,
        "grpo": {"accuracy_before": grpo["eval_before"].get("eval/reward"),
                 "accuracy_after": grpo["metrics"].get("eval/reward"),
                 "reward_first_steps": grpo_reward[0],
                 "reward_last_steps": grpo_reward[1],
                 "checkpoint": grpo["checkpoint"]},
    }
    runs = {"GRPO (rule reward)": root / "grpo"}
    if rlhf:
        rm_start = cfg.rm.init_from or _reward_model_base(cfg, root, sft["output"])
        rm = run_stage(_stage_config(cfg, root, rm={"init_from": rm_start,
                                                    "sample_from": cfg.rm.sample_from or sft["output"]}), "rm")
        logger.info("reward model: held-out pairwise accuracy %.2f → %.2f", rm["before/accuracy"], rm["after/accuracy"])
        ppo_cfg = _stage_config(cfg, root / "ppo", model={"path": sft["output"]}, algorithm=PPO_ALGORITHM,
                                reward={"model_path": rm["output"], **PPO_REWARD}, learner=PPO_LEARNER,
                                checkpoint={"keep_best": "eval/gold"})
        ppo = _fit(ppo_cfg)
        summary["rm"] = rm
        summary["ppo"] = _proxy_and_gold(root / "ppo", ppo)
        runs["PPO (reward model)"] = root / "ppo"
    summary["report"] = str(write_report(runs, root / "report.png", title="rlfleet demo: reverse a string"))
    summary["seconds"] = time.perf_counter() - started
    return summary


def _reward_model_base(cfg: RunConfig, root: Path, sft_output: str) -> str:
    """What the reward model starts from: with the tiny model, a fresh one `RM_DEPTH` times as
    deep as the policy (one SFT-initialised at the policy's depth ranked the policy's own
    mistakes right only 70–77 % of the time, and PPO gamed it); with `model.path`, the SFT model."""
    if cfg.model.path is not None:
        return sft_output
    shape = cfg.model.tiny.model_copy(update={"num_layers": RM_DEPTH * cfg.model.tiny.num_layers})
    out = root / "models" / "rm_base"
    if not (out / "config.json").exists():
        build_tiny_causal_lm(out, seed=cfg.seed, shape=shape)
    return str(out)


def _proxy_and_gold(run_dir: Path, fit: dict[str, Any]) -> dict[str, Any]:
    """What PPO did to the reward it trains on (the proxy: the reward model's score) and to the
    task (the gold: exact-answer accuracy), on the held-out prompts, first and last evaluation."""
    evals = [r for r in read_metrics(run_dir) if r.get("eval/gold") is not None]
    first, last = evals[0], evals[-1]
    _, kl_last = _window_means(run_dir, "objective/kl")
    proxy = "eval/reward_model"  # the raw score: running normalisation moves eval/reward's scale
    return {"proxy_before": first[proxy], "proxy_after": last[proxy],
            "gold_before": first["eval/gold"], "gold_after": last["eval/gold"], "last_step": last["step"],
            "best": fit["best_checkpoint"], "kl_last_steps": kl_last, "kl_max": _max(run_dir, "objective/kl"),
            "checkpoint": fit["checkpoint"]}


def _window_means(run_dir: Path, key: str, window: int = 10) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window` training steps (per-step values are noisy)."""
    values = [r[key] for r in read_metrics(run_dir) if r["step"] > 0 and r.get(key) is not None]
    head, tail = values[:window], values[-window:]
    return sum(head) / len(head), sum(tail) / len(tail)


def _max(run_dir: Path, key: str) -> float | None:
    values = [r[key] for r in read_metrics(run_dir) if r.get(key) is not None]
    return max(values) if values else None


def print_summary(s: dict[str, Any]) -> None:
    g = s["grpo"]
    out = sys.stdout
    out.write(f"\nrlfleet demo finished in {s['seconds'] / 60:.1f} min; run folder {s['run_dir']}\n")
    out.write(f"  measured on {machine_line(s['machine'])}: the numbers below depend on the CPU's\n"
              "  instruction set (its fp32 kernels sum in their own order), not only on the seed\n")
    out.write(f"  SFT warm start: held-out token accuracy {s['sft']['after/token_accuracy']:.0%}\n")
    out.write(f"  held-out exact-answer accuracy: {g['accuracy_before']:.0%} after SFT → "
              f"{g['accuracy_after']:.0%} after GRPO\n")
    if "ppo" in s:
        p, rm = s["ppo"], s["rm"]
        kinds = ", ".join(f"{k.split('/')[-1]} {v:.0%}" for k, v in sorted(rm.items()) if k.startswith("after/accuracy/"))
        out.write(f"  reward model: held-out pairwise accuracy {rm['after/accuracy']:.0%} ({kinds})\n")
        out.write("  PPO against the reward model, held-out (greedy):   proxy = reward-model score (raw) | gold = exact answer\n")
        rows = [("SFT start (step 0)", f"{p['proxy_before']:8.3f}", p["gold_before"]),
                (f"after PPO (step {p['last_step']})", f"{p['proxy_after']:8.3f}", p["gold_after"])]
        if p["best"]:
            rows.append((f"best by gold (step {p['best']['step']}, kept)", " " * 8, p["best"]["value"]))
        for label, proxy, gold in rows:
            out.write(f"    {label:<30}{proxy} | {gold:.0%}\n")
        out.write(f"    KL to the reference {p['kl_last_steps']:.3f} (last 10 steps), at most {p['kl_max']:.3f}\n")
    out.write(f"  report: {s['report']}\n")

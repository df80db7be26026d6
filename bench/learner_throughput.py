"""Learner throughput with D = 1 and D = 2 data-parallel learner actors on CPU (gloo): DDP,
and FSDP2 (which also reports the parameters each rank holds).

The same batch (B responses of mixed length, one step = `ppo_epochs` × minibatches of the
policy and critic updates) is trained by a group of D learners, each a Ray actor with one
CPU. Learner tokens/s = (prompt + response tokens of the batch) × ppo_epochs / step time.
Writes JSON to bench/results/learner_throughput.json.

    .venv/bin/python bench/learner_throughput.py [--hidden-size 256] [--layers 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from rlfleet.common.config import RunConfig, TinyModelConfig
from rlfleet.common.records import Experience, Rollout
from rlfleet.common.tiny_models import build_tiny_causal_lm
from rlfleet.deploy.learner_group import LearnerGroup
from rlfleet.learner.learner import Learner

RESULTS = Path(__file__).resolve().parent / "results"


def batch(n: int, seed: int = 0) -> list[Rollout]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(4, 100, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(4, 100, (int(torch.randint(16, 96, (1,), generator=g)),), generator=g).tolist()
        out.append(Rollout(i // 4, prompt, response, [-4.6] * len(response), "length", 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--responses", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "learner_throughput.json"))
    args = parser.parse_args()

    shape = TinyModelConfig(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.hidden_size // 32,
                            intermediate_size=2 * args.hidden_size)
    rollouts = batch(args.responses)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    result: dict = {"setup": {"responses": args.responses, "tokens_per_step": tokens, "hidden_size": args.hidden_size,
                              "layers": args.layers, "steps": args.steps}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = str(build_tiny_causal_lm(Path(tmp) / "policy", seed=0, shape=shape))
            for d, strategy in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
                cfg = RunConfig.model_validate({
                    "rollout": {"prompts_per_step": args.responses // 4, "samples_per_prompt": 4},
                    "learner": {"num_workers": d, "strategy": strategy, "minibatch_size": args.responses // 2,
                                "lr": 1e-5},
                    "algorithm": {"advantage_estimator": "gae", "kl_in": "none"},
                })
                prepared = Learner(cfg.model_copy(update={"learner": cfg.learner.model_copy(
                    update={"num_workers": 1})}), model).prepare(rollouts)
                exp = Experience(rollouts, [float(i % 3) for i in range(len(rollouts))],
                                 [r.prompt_index for r in rollouts], prepared.old_logprobs, prepared.values, None)
                group = LearnerGroup.start(cfg, model)
                try:
                    held = max(ray.get([h.local_numel.remote() for h in group.handles]))
                    group.train_step(exp)  # warm-up
                    times = []
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        group.train_step(exp)
                        times.append(time.perf_counter() - start)
                finally:
                    group.kill()
                median = statistics.median(times)
                name = "D=1" if d == 1 else f"D=2 {strategy}"
                result[name] = {"step_seconds": median, "tokens_per_s": tokens * cfg.learner.ppo_epochs / median,
                                "parameters_per_rank": held}
                print(f"{name}: {median:.2f} s/step, {result[name]['tokens_per_s']:.0f} tokens/s, "  # noqa: T201
                      f"{held} parameters per rank")
    finally:
        ray.shutdown()
    for strategy in ("ddp", "fsdp"):
        ratio = result[f"D=2 {strategy}"]["tokens_per_s"] / result["D=1"]["tokens_per_s"]
        held = result[f"D=2 {strategy}"]["parameters_per_rank"] / result["D=1"]["parameters_per_rank"]
        result[f"speedup_D2_{strategy}_over_D1"], result[f"parameters_per_rank_D2_{strategy}_over_D1"] = ratio, held
        print(f"D=2 {strategy} / D=1: {ratio:.2f}x tokens/s, {held:.2f}x parameters per rank")  # noqa: T201
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

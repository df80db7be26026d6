"""Learner throughput: forward + backward tokens/s and peak memory for the tiny model and a
~100M-parameter model; and D = 1 against D = 2 data-parallel learner actors on CPU (gloo):
DDP, and FSDP2 (which also reports the parameters each rank holds).

Sizes: one learner actor (all the machine's CPUs) trains GRPO steps (policy only) on a batch
of responses of mixed length, in fp32 and under bf16 autocast (`--dtypes`; bf16 pays off only
where the CPU has bf16 matrix units, AMX or AVX-512 BF16); tokens/s = the batch's prompt + response tokens / step time
(one optimizer step: the forward and backward passes and AdamW). Peak memory is the actor
process's peak resident set (and the peak CUDA allocation on a GPU), after its steps.

Data parallel: the same batch (B responses, one step = `ppo_epochs` × minibatches of the
policy and critic updates) is trained by a group of D learners, each a Ray actor with one
CPU. Learner tokens/s = (prompt + response tokens of the batch) × ppo_epochs / step time.

Writes JSON to bench/results/learner_throughput.json.

    .venv/bin/python bench/learner_throughput.py [--hidden-size 256] [--layers 4] [--steps 5] [--sizes tiny,100m]
        [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from weight_push import SHAPES  # bench/ is the script's folder

from rlfleet.common.config import RunConfig, TinyModelConfig
from rlfleet.common.records import Experience, Rollout
from rlfleet.common.tiny_models import build_tiny_causal_lm
from rlfleet.deploy.actors.learner_group import LearnerGroup
from rlfleet.learner.learner import Learner

RESULTS = Path(__file__).resolve().parent / "results"

SIZES = {"tiny": TinyModelConfig(), "100m": SHAPES["100m"]}  # tiny: the model of the demo and the tests


def batch(n: int, seed: int = 0) -> list[Rollout]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(4, 100, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(4, 100, (int(torch.randint(16, 96, (1,), generator=g)),), generator=g).tolist()
        out.append(Rollout(i // 4, prompt, response, [-4.6] * len(response), "length", 0))
    return out


def peak_memory(_learner) -> dict[str, int]:
    """Run inside the learner actor (`__ray_call__`): its peak resident set and CUDA allocation."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


def bench_size(shape: TinyModelConfig, responses: int, steps: int, tmp: str, name: str,
               dtype: str = "float32") -> dict:
    """One learner actor with all the CPUs: GRPO steps (policy forward + backward + AdamW), in
    fp32 or under bf16 autocast (`model.dtype`)."""
    folder = Path(tmp) / name
    model = str(folder if (folder / "config.json").exists() else build_tiny_causal_lm(folder, seed=0, shape=shape))
    rollouts = batch(responses, seed=1)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    cfg = RunConfig.model_validate({
        "model": {"dtype": dtype},
        "rollout": {"prompts_per_step": responses // 4, "samples_per_prompt": 4},
        "learner": {"minibatch_size": responses, "lr": 1e-5},
        "algorithm": {"advantage_estimator": "grpo", "kl_in": "none"},
    })
    cpus = os.cpu_count() or 1
    learner = ray.remote(Learner).options(num_cpus=cpus).remote(cfg, model)
    try:
        params = ray.get(learner.local_numel.remote())
        exp = Experience(rollouts, [float(i % 3) for i in range(responses)], [r.prompt_index for r in rollouts],
                         [r.logprobs for r in rollouts], None, None)
        ray.get(learner.train_step.remote(exp))  # warm-up (allocator, AdamW state)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            ray.get(learner.train_step.remote(exp))
            times.append(time.perf_counter() - start)
        memory = ray.get(learner.__ray_call__.remote(peak_memory))
    finally:
        ray.kill(learner)
    median = statistics.median(times)
    row = {"parameters": params, "responses": responses, "tokens_per_step": tokens, "step_seconds": median,
           "tokens_per_s": tokens / median, "threads": cpus, "dtype": dtype, **memory}
    print(f"{name} {dtype}: {params / 1e6:.1f}M parameters, {row['tokens_per_s']:.0f} tokens/s, "  # noqa: T201
          f"peak RSS {memory['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return row


def bench_parallel(args, tmp: str) -> dict:
    """D = 1 against D = 2 learner actors (one CPU each), DDP and FSDP2, on one batch."""
    shape = TinyModelConfig(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.hidden_size // 32,
                            intermediate_size=2 * args.hidden_size)
    rollouts = batch(args.responses)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    result: dict = {"data_parallel_setup": {"responses": args.responses, "tokens_per_step": tokens,
                                            "hidden_size": args.hidden_size, "layers": args.layers}}
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
    for strategy in ("ddp", "fsdp"):
        ratio = result[f"D=2 {strategy}"]["tokens_per_s"] / result["D=1"]["tokens_per_s"]
        held = result[f"D=2 {strategy}"]["parameters_per_rank"] / result["D=1"]["parameters_per_rank"]
        result[f"speedup_D2_{strategy}_over_D1"], result[f"parameters_per_rank_D2_{strategy}_over_D1"] = ratio, held
        print(f"D=2 {strategy} / D=1: {ratio:.2f}x tokens/s, {held:.2f}x parameters per rank")  # noqa: T201
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--responses", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,100m", help="models for tokens/s and peak memory ('' skips)")
    parser.add_argument("--size-responses", default="tiny:64,100m:8", help="responses per step of each size")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="learner compute dtypes of the size runs (bfloat16: autocast over fp32 weights)")
    parser.add_argument("--no-parallel", action="store_true", help="skip D = 1 against D = 2")
    parser.add_argument("--out", default=str(RESULTS / "learner_throughput.json"))
    args = parser.parse_args()

    result: dict = {"setup": {"cpus": os.cpu_count(), "steps": args.steps}}
    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            per_size = dict(item.split(":") for item in args.size_responses.split(","))
            for name in filter(None, args.sizes.split(",")):
                for dtype in args.dtypes.split(","):  # fp32 first: the key without a suffix
                    key = f"size_{name}" if dtype == "float32" else f"size_{name}_{dtype}"
                    result[key] = bench_size(SIZES[name], int(per_size[name]), args.steps, tmp, name, dtype)
            if not args.no_parallel:
                result.update(bench_parallel(args, tmp))
    finally:
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

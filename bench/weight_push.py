"""Weight push: latency and bytes/s of handing the learner's weights to a rollout worker, for
models of about 1M, 10M and 100M parameters, by both paths a run can use
(`rollout.weight_sync`): safetensors chunks through the Ray object store, and the bucketed
broadcast from the learner (gloo here, NCCL on GPUs).

Each push is the driver's own `push_weights`: the learner publishes (or broadcasts), the vLLM
worker loads the weights into its engine and reports the new version, which the pool checks.
The two paths alternate push by push; the median of `--pushes` timed pushes (after one warm-up
each) is reported. Bytes are the float32 weights pushed. The push's share of a training step
is in bench/e2e_grpo.py's step breakdown.

Writes bench/results/weight_push.json.

    .venv/bin/python bench/weight_push.py [--sizes 1m,10m,100m] [--pushes 3]
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

from rlfleet.common.config import RoleResources, RunConfig, TinyModelConfig
from rlfleet.common.tiny_models import build_tiny_causal_lm
from rlfleet.deploy.actors.assembly import start_rollout_pool
from rlfleet.deploy.actors.learner_group import LearnerGroup
from rlfleet.deploy.actors.parts import Parts
from rlfleet.deploy.loop.stages import push_weights

RESULTS = Path(__file__).resolve().parent / "results"

# Tiny llama shapes (character vocabulary: nearly every parameter is in the decoder layers).
SHAPES = {
    "1m": TinyModelConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
    "10m": TinyModelConfig(hidden_size=320, num_layers=6, num_heads=10, intermediate_size=1280),
    "100m": TinyModelConfig(hidden_size=768, num_layers=11, num_heads=12, intermediate_size=3072),
}
PATHS = ("object_store", "broadcast")


def weight_bytes(model: Path) -> tuple[int, int]:
    """(parameters, bytes) of the model's weights, from its safetensors header."""
    from safetensors import safe_open

    numel = nbytes = 0
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_slice(name)
            n = 1
            for d in t.get_shape():
                n *= d
            numel += n
            nbytes += n * 4
    return numel, nbytes


def bench_size(model: str, pushes: int) -> dict:
    cfgs = {path: RunConfig.model_validate({"rollout": {"weight_sync": path, "num_workers": 1}}) for path in PATHS}
    learner = LearnerGroup.start(cfgs["object_store"], model)
    pool = start_rollout_pool(model, cfgs["object_store"].rollout, RoleResources(num_cpus=1))
    parts = Parts(learner, pool, None, None, model)
    seconds: dict[str, list[float]] = {p: [] for p in PATHS}
    version = 0
    try:
        for i in range(pushes + 1):
            for path in PATHS:
                version += 1
                start = time.perf_counter()
                push_weights(cfgs[path], parts, version)
                if i:  # the first push of each path warms up (connections, buffers)
                    seconds[path].append(time.perf_counter() - start)
    finally:
        pool.close()
        learner.kill()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1m,10m,100m")
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "weight_push.json"))
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result: dict = {"setup": {"pushes": args.pushes, "workers": 1, "dtype": "float32", "cpus": os.cpu_count()}}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes.split(","):
                model = build_tiny_causal_lm(Path(tmp) / size, seed=0, shape=SHAPES[size])
                params, nbytes = weight_bytes(model)
                seconds = bench_size(str(model), args.pushes)
                row = {"parameters": params, "bytes": nbytes}
                for path, values in seconds.items():
                    latency = statistics.median(values)
                    row[path] = {"seconds": latency, "bytes_per_s": nbytes / latency, "all_seconds": values}
                result[size] = row
                print(f"{size}: {params / 1e6:.1f}M parameters, "  # noqa: T201
                      + ", ".join(f"{p} {row[p]['seconds']:.3f} s ({row[p]['bytes_per_s'] / 1e6:.0f} MB/s)"
                                  for p in PATHS), flush=True)
    finally:
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

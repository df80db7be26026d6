"""Reward-model scoring throughput: 256 responses with the tiny reward model, by micro-batch size.

Every configuration scores the same 256 (prompt + response) sequences of mixed length; the
largest forward pass is bounded by the micro-batch size. Writes JSON to
bench/results/reward_throughput.json.

    .venv/bin/python bench/reward_throughput.py [--responses 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlfleet.common.tiny_models import build_tiny_reward_model
from rlfleet.services.reward_model import RewardModelScorer

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batches", default="8,32,128,256")
    parser.add_argument("--out", default=str(RESULTS / "reward_throughput.json"))
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 160, (args.responses,), generator=g).tolist()
    seqs = [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]
    result: dict = {"setup": {"responses": args.responses, "tokens": sum(lengths), "threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_reward_model(Path(tmp) / "rm", seed=0))
        for size in (int(s) for s in args.micro_batches.split(",")):
            scorer = RewardModelScorer(model, micro_batch_size=size)
            scorer.score(seqs[:size])  # warm-up
            scorer.batch_sizes.clear()
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                scorer.score(seqs)
                times.append(time.perf_counter() - start)
            best = statistics.median(times)
            result[f"micro_batch_{size}"] = {
                "responses_per_s": args.responses / best,
                "tokens_per_s": sum(lengths) / best,
                "largest_forward": max(scorer.batch_sizes),
                "seconds": times,
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: round(v["responses_per_s"]) for k, v in result.items() if k != "setup"}))  # noqa: T201


if __name__ == "__main__":
    main()

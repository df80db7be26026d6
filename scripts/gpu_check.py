"""The GPU checks (issue: colocated GPUs), without Ray or vLLM: on one CUDA device with torch,
transformers, peft, pydantic and safetensors, each check prints PASS or FAIL with its numbers;
the exit code is the number of failures. Run by `scripts/gpu_check.sh`; `--dry-run` runs every
check on the CPU instead (bf16 autocast against fp32 where the GPU would compare bf16 CUDA with
fp32 CPU), which CI does (tests/test_gpu_check.py), Ray and vLLM made unimportable to prove
the script needs neither.

Checks: the learner in bf16 (GRPO, and PPO with a critic) against fp32 on the CPU; LoRA merged
from device tensors against a merge done by hand on the CPU; FSDP2 on a one-rank group (NCCL on
a GPU) against the unsharded learner; the reference and reward models against fp32 CPU; the HF
rollout worker's sleep (memory released, measured) and wake (the push refills it, greedy output
unchanged); `learner.offload` (memory moved, updates unchanged); a checkpoint written from the
device reloaded on the CPU. The CPU side runs in a subprocess with the GPU hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS: list[tuple[str, bool, str]] = []


def say(line: str, stream=sys.stdout) -> None:
    stream.write(line + "\n")
    stream.flush()


def check(name: str, ok: bool, numbers: str) -> None:
    RESULTS.append((name, ok, numbers))
    say(f"{'PASS' if ok else 'FAIL'} {name}: {numbers}")


def config(estimator: str, dtype: str, **learner):
    from rlfleet.common.config import RunConfig

    group = estimator != "gae"
    return RunConfig.model_validate({
        "model": {"dtype": dtype, "lora": {"enabled": learner.pop("lora", False), "rank": 8}},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4},
        "learner": {"minibatch_size": 16, "lr": 1e-4, "critic_lr": 1e-4, **learner},
        "algorithm": {"advantage_estimator": estimator, "kl_in": "loss" if group else "reward",
                      "kl_estimator": "k3" if group else "k1", "kl_coef": 0.05},
        "reference": {"colocate_with_learner": True},
    })


def rollouts(seed: int = 0, version: int = 0):
    """16 responses (4 prompts × 4) of varied lengths, some ended by EOS."""
    from rlfleet.common.records import Rollout

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(16):
        prompt = torch.randint(4, 90, (5 + i % 4,), generator=g).tolist()
        response = torch.randint(4, 90, (3 + (7 * i) % 11,), generator=g).tolist()
        out.append(Rollout(i // 4, prompt, response, [-4.5] * len(response), "stop" if i % 3 == 0 else "length", version))
    return out


def experience(learner, batch):
    from rlfleet.common.records import Experience

    prepared = learner.prepare(batch)
    scores = [float((7 * i) % 5) / 4 for i in range(len(batch))]
    return prepared, Experience(batch, scores, [r.prompt_index for r in batch], prepared.old_logprobs,
                                prepared.values, prepared.ref_logprobs)


def learner_numbers(models: Path, dtype: str) -> dict:
    """Old log-probs and step-1 metrics of GRPO and PPO learners, references and rewards."""
    from rlfleet.learner.learner import Learner
    from rlfleet.services.reference import ReferenceService
    from rlfleet.services.reward_model import RewardModelScorer

    out: dict = {}
    batch = rollouts()
    for estimator in ("grpo", "gae"):
        learner = Learner(config(estimator, dtype), str(models / "policy"))
        prepared, exp = experience(learner, batch)
        result = learner.train_step(exp)
        out[estimator] = {"old": prepared.old_logprobs, "metrics": result.metrics}
    out["reference"] = ReferenceService(str(models / "policy"), compute_dtype=dtype).logprobs(
        [r.prompt_ids for r in batch], [r.response_ids for r in batch])
    out["reward"] = RewardModelScorer(str(models / "reward"), compute_dtype=dtype).score(
        [r.prompt_ids + r.response_ids for r in batch])
    return out


def mean_abs(a: list[list[float]], b: list[list[float]]) -> float:
    flat = [abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(flat) / len(flat)


def compare_with_cpu(device_numbers: dict, cpu: dict, label: str) -> None:
    for estimator in ("grpo", "gae"):
        d, c = device_numbers[estimator], cpu[estimator]
        gap = mean_abs(d["old"], c["old"])
        check(f"{estimator} old log-probs, {label} vs fp32 CPU", gap < 0.02, f"mean |Δ| {gap:.2e} nats (< 2e-2)")
        # bf16 rounds each product to ~3 digits; over two layers the norms move by well under 5 %
        for key, rel in (("learner/grad_norm", 0.05), ("loss/value_avg", 0.05)):
            if c["metrics"].get(key) is None:
                continue
            a, b = d["metrics"][key], c["metrics"][key]
            off = abs(a - b) / max(abs(b), 1e-8)
            check(f"{estimator} step 1 {key}, {label} vs fp32 CPU", off < rel, f"{a:.5g} vs {b:.5g} (rel {off:.2e} < {rel})")
        a, b = d["metrics"]["loss/policy_avg"], c["metrics"]["loss/policy_avg"]
        check(f"{estimator} step 1 loss/policy_avg, {label} vs fp32 CPU", abs(a - b) < 0.02,
              f"{a:.5g} vs {b:.5g} (|Δ| {abs(a - b):.2e} < 2e-2)")
    gap = mean_abs(device_numbers["reference"], cpu["reference"])
    check(f"reference log-probs, {label} vs fp32 CPU", gap < 0.02, f"mean |Δ| {gap:.2e} nats (< 2e-2)")
    gap = max(abs(a - b) for a, b in zip(device_numbers["reward"], cpu["reward"], strict=True))
    check(f"reward scores, {label} vs fp32 CPU", gap < 0.05, f"max |Δ| {gap:.2e} (< 5e-2)")


def lora_merge(models: Path, dtype: str) -> None:
    """The merged weights the learner pushes, from device tensors, against W + scale·B·A by hand on the CPU."""
    from rlfleet.learner.learner import Learner
    from rlfleet.learner.models import merged_state_dict

    learner = Learner(config("grpo", dtype, lora=True), str(models / "policy"))
    learner.train_step(experience(learner, rollouts())[1])  # B is no longer 0
    merged = merged_state_dict(learner.policy)
    worst = 0.0
    for name, module in learner.policy.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight.cpu(), module.lora_B["default"].weight.cpu()
        by_hand = module.base_layer.weight.cpu() + module.scaling["default"] * (b @ a)
        key = name.replace("base_model.model.", "", 1) + ".weight"
        worst = max(worst, (merged[key].float().cpu() - by_hand).abs().max().item())
    check("LoRA merge from device tensors", worst < 1e-5, f"max |Δ| {worst:.2e} against the CPU merge (< 1e-5)")


def fsdp_one_rank(models: Path) -> None:
    from rlfleet.learner.learner import Learner

    plain = Learner(config("grpo", "float32"), str(models / "policy"))
    sharded = Learner(config("grpo", "float32", strategy="fsdp"), str(models / "policy"))
    host, port = sharded.open_dp_group(1)
    sharded.join_dp_group(0, 1, host, port)
    try:
        a = plain.train_step(experience(plain, rollouts())[1]).metrics
        b = sharded.train_step(experience(sharded, rollouts())[1]).metrics
        off = abs(a["learner/grad_norm"] - b["learner/grad_norm"]) / a["learner/grad_norm"]
        loss = abs(a["loss/policy_avg"] - b["loss/policy_avg"])
        check("FSDP2 on a one-rank group vs unsharded", off < 1e-3 and loss < 1e-4,
              f"grad_norm rel {off:.2e} (< 1e-3), loss |Δ| {loss:.2e} (< 1e-4)")
    finally:
        torch.distributed.destroy_process_group()


def offload(models: Path, device: torch.device) -> None:
    from rlfleet.learner.learner import Learner

    plain = Learner(config("gae", "float32"), str(models / "policy"))
    moving = Learner(config("gae", "float32", offload=True), str(models / "policy"))
    metrics = {id(plain): [], id(moving): []}
    freed, moved = [], []
    for step in range(2):
        for learner in (plain, moving):
            metrics[id(learner)].append(learner.train_step(experience(learner, rollouts(step, step))[1]).metrics)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        moved.append(moving.offload())
        if device.type == "cuda":
            freed.append(before - torch.cuda.memory_allocated(device))
    numel = sum(p.numel() for m in (moving.policy, moving.critic) for p in m.parameters())
    worst = max(abs(a[k] - b[k]) for a, b in zip(metrics[id(plain)], metrics[id(moving)], strict=True)
                for k in a if isinstance(a[k], float) and not k.startswith("timing/"))
    on_device = f", device memory freed {min(freed) / 2**20:.1f} MiB" if freed else ""
    ok = worst < 1e-5 and min(moved) >= 4 * 4 * numel and (not freed or min(freed) >= 4 * 4 * numel)
    check("learner.offload", ok, f"moved {min(moved) / 2**20:.1f} MiB (>= params, grads, 2 Adam moments: "
          f"{16 * numel / 2**20:.1f}){on_device}; step metrics max |Δ| {worst:.1e} (< 1e-5)")


def rollout_sleep(models: Path) -> None:
    from rlfleet.common.config import RolloutConfig
    from rlfleet.common.records import SamplingSpec
    from rlfleet.rollout.hf_worker import HFRolloutWorker
    from rlfleet.weight_sync.object_store import OBJECT_STORE, object_store_chunks

    path = str(models / "policy")
    worker = HFRolloutWorker(path, RolloutConfig(backend="hf", sleep_between_steps=True))
    greedy = SamplingSpec(n=1, max_tokens=16, temperature=0.0)
    prompts = ["12+34=", "a cat", "7*8="]
    before = worker.generate(prompts, greedy).rollouts
    state = {k: v.detach().cpu().clone() for k, v in worker._model.state_dict().items()}
    weights = sum(p.numel() * p.element_size() for p in worker._model.parameters())
    freed = worker.sleep()
    worker.wake_up()
    try:
        worker.generate(prompts, greedy)
        refused = False
    except RuntimeError:
        refused = True
    from rlfleet.rollout.hf_worker import checkpoint_index

    names = set(checkpoint_index(worker._model, worker._model.state_dict()))
    worker.receive_weights(OBJECT_STORE, 1, 0, *object_store_chunks({k: v for k, v in state.items() if k in names}))
    after = worker.generate(prompts, greedy).rollouts
    same = all(a.response_ids == b.response_ids for a, b in zip(before, after, strict=True))
    gap = max(abs(x - y) for a, b in zip(before, after, strict=True) for x, y in zip(a.logprobs, b.logprobs, strict=True))
    check("HF rollout worker sleep/wake", freed >= weights and refused and same and gap < 1e-4,
          f"freed {freed / 2**20:.1f} MiB (>= weights {weights / 2**20:.1f}); generate refused while unpushed: "
          f"{refused}; greedy after the push unchanged: {same}, log-prob max |Δ| {gap:.1e} (< 1e-4)")


def checkpoint_to_cpu(models: Path, work: Path, dry_run: bool) -> None:
    from safetensors.torch import load_file

    from rlfleet.learner.learner import Learner

    learner = Learner(config("gae", "float32"), str(models / "policy"))
    learner.train_step(experience(learner, rollouts())[1])
    learner.save(str(work / "ckpt"))
    cpu_side(["reload", str(models), str(work)], dry_run)
    reloaded = load_file(str(work / "reloaded.safetensors"))
    mine = learner.parameter_snapshot()
    worst = max((reloaded[k] - v).abs().max().item() for k, v in mine.items())
    check("checkpoint written from the device, reloaded on the CPU", reloaded.keys() == mine.keys() and worst == 0.0,
          f"{len(mine)} tensors, max |Δ| {worst:.1e} (exact)")


def cpu_side(args: list[str], dry_run: bool) -> None:
    """This script's CPU half, in a process that sees no GPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, __file__, "--cpu-side", *args] + (["--dry-run"] if dry_run else [])
    subprocess.run(cmd, env=env, check=True, timeout=600)


def run_cpu_side(args: list[str]) -> None:
    from safetensors.torch import save_file

    from rlfleet.learner.learner import Learner

    what, models, work = args[0], Path(args[1]), Path(args[2])
    if what == "numbers":
        (work / "cpu.json").write_text(json.dumps(learner_numbers(models, "float32")))
    elif what == "reload":
        learner = Learner(config("gae", "float32"), str(models / "policy"))
        learner.load(str(work / "ckpt"))
        save_file(learner.parameter_snapshot(), str(work / "reloaded.safetensors"))


def block_ray_and_vllm() -> None:
    """Make `import ray` / `import vllm` fail, as on a GPU machine that has neither."""
    import importlib.abc

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("ray", "vllm"):
                raise ImportError(f"gpu_check runs without {name.split('.')[0]}")

    sys.meta_path.insert(0, Blocked())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every check on the CPU (CI)")
    parser.add_argument("--cpu-side", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        block_ray_and_vllm()
    if args.cpu_side:
        run_cpu_side(args.cpu_side)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        say("no CUDA device: run with --dry-run to check on the CPU", sys.stderr)
        return 2
    from rlfleet.common.config import TinyModelConfig
    from rlfleet.common.tiny_models import build_tiny_causal_lm, build_tiny_reward_model

    device = torch.device("cpu" if args.dry_run else "cuda")
    label = "bf16 autocast on the CPU" if args.dry_run else f"bf16 on {torch.cuda.get_device_name(0)}"
    say(f"gpu_check: torch {torch.__version__}, device {device}, {label}")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        shape = TinyModelConfig(hidden_size=256, num_heads=4, num_layers=2, intermediate_size=512)
        build_tiny_causal_lm(work / "models" / "policy", seed=0, shape=shape)
        build_tiny_reward_model(work / "models" / "reward", seed=1, shape=shape)
        models = work / "models"
        cpu_side(["numbers", str(models), str(work)], args.dry_run)
        cpu = json.loads((work / "cpu.json").read_text())
        compare_with_cpu(learner_numbers(models, "bfloat16"), cpu, label)
        lora_merge(models, "bfloat16")
        fsdp_one_rank(models)
        offload(models, device)
        rollout_sleep(models)
        checkpoint_to_cpu(models, work, args.dry_run)
    failed = [name for name, ok, _ in RESULTS if not ok]
    say(f"gpu_check: {len(RESULTS) - len(failed)} passed, {len(failed)} failed in {time.monotonic() - began:.0f} s"
        + (f" ({'; '.join(failed)})" if failed else ""))
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())

"""`scripts/gpu_check.sh --dry-run`: every check of the GPU script, run on the CPU with Ray and
vLLM unimportable (the GPU machine has neither), passes; on a GPU the same script compares bf16
CUDA with fp32 CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("grpo old log-probs", "gae step 1 loss/value_avg", "reference log-probs", "reward scores",
          "LoRA merge from device tensors", "FSDP2 on a one-rank group", "learner.offload",
          "HF rollout worker sleep/wake", "checkpoint written from the device, reloaded on the CPU")


@pytest.mark.unit
def test_the_gpu_scripts_checks_pass_on_the_cpu_without_ray_or_vllm():
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in CHECKS:
        assert any(line.startswith(f"PASS {name}") for line in lines), (name, done.stdout[-3000:])
    assert not [line for line in lines if line.startswith("FAIL")]
    assert "14 passed, 0 failed" in done.stdout

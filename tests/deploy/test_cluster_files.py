"""The files users take to a GPU cluster stay true to the config schema and to each other:
every example config validates, and the cluster launcher YAML and the KubeRay RayJob offer the
resources (GPUs, CPUs, the `learner` / `rollout` node labels) that the 7B examples ask for."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from rlfleet.common.config import RoleResources, RunConfig
from rlfleet.common.config_io import ConfigError, load_config
from rlfleet.deploy.actors.assembly import needs_reference_actor
from rlfleet.deploy.app.submit import RUNTIME_ENV_FILE, entrypoint, runtime_env

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "deploy" / "cluster"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BIG = [ROOT / "examples" / "grpo_7b.yaml", ROOT / "examples" / "ppo_7b.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.total_steps >= 1


def demand(cfg: RunConfig) -> Counter:
    """Ray resources the run's actors ask for, summed over every actor of every role."""
    roles: list[tuple[RoleResources, int]] = [
        (cfg.cluster.learner, cfg.learner.num_workers),
        (cfg.cluster.rollout, cfg.rollout.num_workers),
        (cfg.cluster.reward, 1),
    ]
    if needs_reference_actor(cfg):
        roles.append((cfg.cluster.reference, 1))
    total: Counter = Counter()
    for res, count in roles:
        total.update({"CPU": res.num_cpus * count, "GPU": res.num_gpus * count})
        total.update({k: v * count for k, v in res.resources.items()})
    return total


def per_label(cfg: RunConfig, label: str) -> Counter:
    """What the actors pinned to node label `label` need (they can only use those nodes)."""
    total: Counter = Counter()
    for res, count in ((cfg.cluster.learner, cfg.learner.num_workers), (cfg.cluster.rollout, cfg.rollout.num_workers),
                       (cfg.cluster.reward, 1)):
        if label in res.resources:
            total.update({"CPU": res.num_cpus * count, "GPU": res.num_gpus * count, label: res.resources[label] * count})
    return total


def launcher_groups() -> dict[str, tuple[dict, int]]:
    """Cluster launcher: node type → (resources of one node, nodes at min_workers)."""
    spec = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    out = {}
    for name, node in spec["available_node_types"].items():
        count = 1 if name == spec["head_node_type"] else node["min_workers"]
        out[name] = (dict(node["resources"]), count)
    return out


def rayjob_groups() -> dict[str, tuple[dict, int]]:
    """RayJob: worker group → (Ray resources of one pod, replicas), read from rayStartParams
    and the pod's limits (which must agree with each other)."""
    spec = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    out = {}
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(params["num-gpus"])
        assert int(limits["nvidia.com/gpu"]) == gpus, group["groupName"]
        custom = json.loads(json.loads(params["resources"]))
        out[group["groupName"]] = ({"CPU": float(limits["cpu"]), "GPU": gpus, **custom}, group["replicas"])
    return out


def capacity(groups: dict[str, tuple[dict, int]], label: str | None = None) -> Counter:
    total: Counter = Counter()
    for resources, count in groups.values():
        if label is None or label in resources:
            total.update({k: v * count for k, v in resources.items()})
    return total


@pytest.mark.parametrize("groups", [launcher_groups, rayjob_groups], ids=["launcher", "rayjob"])
@pytest.mark.parametrize("path", BIG, ids=lambda p: p.name)
def test_cluster_files_fit_the_7b_examples(path, groups):
    cfg = load_config(path)
    nodes = groups()
    have, need = capacity(nodes), demand(cfg)
    for resource, amount in need.items():
        assert amount <= have[resource], f"{path.name} needs {resource}={amount:g}, the cluster has {have[resource]:g}"
    for label in ("learner", "rollout"):  # the labelled actors fit on the labelled nodes alone
        want, offer = per_label(cfg, label), capacity(nodes, label)
        assert want[label] > 0, f"{path.name} pins nothing to `{label}` nodes"
        for resource, amount in want.items():
            assert amount <= offer[resource], f"{path.name}: {label} nodes lack {resource}"
    # STRICT_PACK puts every learner rank on one node: one learner node must hold them all.
    learner_node = next(res for res, _ in nodes.values() if "learner" in res)
    assert cfg.learner.num_workers * cfg.cluster.learner.num_gpus <= learner_node["GPU"]
    # The engines span exactly their tensor-parallel GPUs (the config validator's rule).
    assert cfg.cluster.rollout.num_gpus == cfg.rollout.tensor_parallel_size


def test_rayjob_runs_an_example_and_carries_the_token_everywhere():
    spec = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayJob"
    entry = spec["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "rlfleet.deploy.app.job"]
    load_config(ROOT / entry[3], entry[4:])  # the config it names exists and validates
    cluster = spec["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    pods.append(spec["spec"]["submitterPodTemplate"])
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rlfleet-ray-token"


def test_launcher_turns_token_auth_on_and_ships_the_token():
    spec = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for command in spec["head_start_ray_commands"] + spec["worker_start_ray_commands"]:
        assert "ray stop" in command or command.startswith("RAY_AUTH_MODE=token ray start")
    assert "~/.ray/auth_token" in spec["file_mounts"].values()


def test_dockerfile_installs_what_the_jobs_run():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "pip install --no-cache-dir \"vllm==${VLLM_VERSION}\"" in text  # vLLM (and its torch) first
    assert 'pip install --no-cache-dir ".[gpu]"' in text and "[cpu]" not in text
    assert "import rlfleet.deploy.app.job" in text and "RAY_AUTH_MODE=token" in text
    for folder in ("common", "learner", "rollout", "services", "deploy", "examples"):
        assert f"COPY --chown=ray:users {folder} {folder}" in text


def test_submit_builds_the_documented_runtime_env_and_entrypoint():
    env = runtime_env("/some/dir")
    assert env["working_dir"] == "/some/dir" and set(env) == {"working_dir", "excludes"}
    assert {".venv/", ".git/", "runs/", "checkpoints/", "models/"} <= set(env["excludes"])
    assert entrypoint("examples/grpo_tiny.yaml", ["total_steps=2", "logging.run_dir=/a b"]) == (
        "python -m rlfleet.deploy.app.job examples/grpo_tiny.yaml total_steps=2 'logging.run_dir=/a b'"
    )
    assert RUNTIME_ENV_FILE.is_file()


def test_gpu_shares_are_checked_against_tensor_parallelism():
    base = ROOT / "examples" / "grpo_7b.yaml"
    with pytest.raises(ConfigError, match=r"cluster.rollout.num_gpus=2 must equal rollout.tensor_parallel_size=1"):
        load_config(base, ["cluster.rollout.num_gpus=2"])
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size=2 needs whole GPUs"):
        load_config(base, ["cluster.rollout.num_gpus=0.5", "rollout.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"cluster.learner.num_gpus=1.5: above 1 a share must be a whole number"):
        load_config(base, ["cluster.learner.num_gpus=1.5"])
    assert load_config(base, ["cluster.rollout.num_gpus=2", "rollout.tensor_parallel_size=2"])

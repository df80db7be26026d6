"""A GRPO job on a real 3-node Ray cluster on this machine (tests/cluster.py: a head that is
also the learner node, two rollout nodes; token auth), submitted as users submit it: placement by node resource,
checked per actor; weights pushed from the learner's node to engines on two others; a rollout
node SIGKILLed mid-run (its raylet and every process on it), the run going on with the other
engine and growing back when a node with the `rollout` resource joins again."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from rlfleet.common.metrics import read_metrics
from tests.cluster import BIN, ROOT, start_cluster, stop_cluster
from tests.services.rule_fixtures import HOLD_MARKER

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
PROMPTS, SAMPLES, STEPS = 4, 4, 24


@pytest.fixture(scope="module")
def cluster():
    # the head is also the learner's node and the services' (pinned there: a service placed on a
    # rollout node would take the CPU its engine needs)
    c = start_cluster(head_cpus=4, head_resources={"learner": 1, "services": 2})
    try:
        c.add_node("rollout-a", num_cpus=1, resources={"rollout": 1})
        c.add_node("rollout-b", num_cpus=1, resources={"rollout": 1})
        yield c
    finally:
        HOLD_MARKER.unlink(missing_ok=True)
        stop_cluster(c)


def _state(cluster, kind: str) -> list[dict]:
    out = cluster.ray("list", kind, "--format", "json", "--limit", "1000", "--address", cluster.dashboard)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _placement(cluster) -> dict[str, list[str]]:
    """Alive actor class -> the custom resources of the node each runs on ('head' for none)."""
    nodes = {n["node_id"]: sorted(k for k in n["resources_total"] if k in ("learner", "rollout")) or ["head"]
             for n in _state(cluster, "nodes") if n["state"] == "ALIVE"}
    placed: dict[str, list[str]] = {}
    for actor in _state(cluster, "actors"):
        if actor["state"] == "ALIVE" and actor["node_id"] in nodes:
            placed.setdefault(actor["class_name"], []).append(nodes[actor["node_id"]][0])
    return placed


def _rows(run) -> list[dict]:
    return read_metrics(run) if (run / "metrics.jsonl").is_file() else []


def _wait(what: str, until, deadline_s: float, cluster, job: str):
    deadline = time.monotonic() + deadline_s
    while not (value := until()):
        assert time.monotonic() < deadline, f"waited {deadline_s:.0f} s for {what}\n" + _logs(cluster, job)
        time.sleep(0.5)
    return value


def _logs(cluster, job: str) -> str:
    return cluster.ray("job", "logs", job, "--address", cluster.dashboard).stdout[-4000:]


def test_a_job_across_nodes_survives_a_lost_rollout_node_and_grows_back(cluster, tmp_path):
    HOLD_MARKER.unlink(missing_ok=True)
    submitted = subprocess.run(
        [str(BIN / "rlfleet"), "submit", "examples/grpo_tiny.yaml", f"total_steps={STEPS}",
         f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}", "rollout.num_workers=2",
         "rollout.max_response_tokens=8", "cluster.learner.resources={learner: 1}",
         "cluster.rollout.resources={rollout: 1}", "cluster.reward.resources={services: 1}",
         "cluster.reference.resources={services: 1}", "checkpoint.every_steps=0", "logging.eval_every_steps=0",
         f"logging.run_dir={tmp_path}", "--address", cluster.dashboard,
         "reward.rules=[{function: 'tests.services.rule_fixtures:math_answer_while_not_held', timeout_s: 900}]"],
        env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = submitted.stdout.strip().splitlines()[-1]
    _wait("two steps", lambda: len(_rows(tmp_path)) >= 2, 300, cluster, job)

    # Placement by node resource, read per actor from Ray's state.
    placed = _placement(cluster)
    assert placed["Learner"] == ["learner"], placed
    assert sorted(placed["VLLMRolloutWorker"]) == ["rollout", "rollout"], placed
    assert placed["RewardService"] == ["learner"] and placed["ReferenceService"] == ["learner"]  # not on rollout nodes
    rows = _rows(tmp_path)
    assert all(r["rollout/min_version"] == r["rollout/max_version"] == r["step"] for r in rows)  # pushes arrived

    # A rollout node lost, as a host is: its raylet and every process on it, SIGKILLed at once.
    HOLD_MARKER.touch()  # the job waits at its next scoring while the node goes
    try:
        killed_after = len(_rows(tmp_path))
        assert cluster.kill_node("rollout-b") >= 2  # the raylet and at least the engine's worker
    finally:
        HOLD_MARKER.unlink(missing_ok=True)
    down = _wait("a step run without the lost worker", lambda: next(
        (r for r in _rows(tmp_path) if r.get("rollout/workers_down") == 1.0), None), 240, cluster, job)
    assert down["step"] > killed_after and down["rollout/lost_workers"] >= 1.0

    # The node joins again: the worker set aside is restarted there and rejoins, re-synced.
    HOLD_MARKER.touch()
    try:
        cluster.add_node("rollout-b2", num_cpus=1, resources={"rollout": 1})
        _wait("the lost worker restarted on the new node",
              lambda: len(_placement(cluster).get("VLLMRolloutWorker", [])) == 2, 300, cluster, job)
        rejoined_after = len(_rows(tmp_path))
    finally:
        HOLD_MARKER.unlink(missing_ok=True)
    deadline = time.monotonic() + 600
    status = ""
    while (status := _job_status(cluster, job)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, _logs(cluster, job)
        time.sleep(2)
    assert status == "SUCCEEDED", _logs(cluster, job)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step once
    for row in rows:  # no group lost or duplicated, every record from the learner's version
        assert row["rollout/num_samples"] == PROMPTS * SAMPLES and row["rollout/complete_groups"] == PROMPTS
        assert row["learner/version"] == row["step"] and row["rollout/num_workers"] == 2.0
    # back within a few steps of its restart (these steps take 0.1 s; the pool's call to it is
    # answered once Ray has told the driver where the restarted actor is), and for good
    back = next((r["step"] for r in rows if r["step"] > rejoined_after and r["rollout/workers_down"] == 0.0), None)
    assert back is not None and back <= rejoined_after + 8, [(r["step"], r["rollout/workers_down"]) for r in rows]
    assert all(r["rollout/workers_down"] == 0.0 for r in rows if r["step"] >= back)
    assert rows[-1]["rollout/resynced"] >= 1.0 and rows[-1]["rollout/lost_workers"] == 1.0


def _job_status(cluster, job: str) -> str:
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    out = subprocess.run([str(BIN / "python"), "-c", code, cluster.dashboard, job], env=cluster.env,
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or f"UNKNOWN: {out.stderr[-500:]}"

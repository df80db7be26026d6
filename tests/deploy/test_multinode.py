"""Jobs on one real multi-node Ray cluster on this machine (tests/cluster.py: a head holding the
services and the drivers, a learner node, two rollout nodes; nodes join and are lost as the
tests go; token authentication on 127.0.0.1), submitted as users submit them:

- the clusters guide's `ray job submit` line (docs/guides/clusters.md) runs a 2-step GRPO job to
  SUCCEEDED, and a job whose reward code cannot score ends FAILED with the message;
- a GRPO job placed by node resource (checked per actor), grown from 1 to 2 rollout workers by
  `rlfleet scale` right after submission, in the overlapped loop: one engine's process
  SIGKILLed (Ray restarts it), then a whole rollout node SIGKILLed (its raylet and every
  process on it) — the run goes on with the other engine — and a node with the `rollout`
  resource joining again, where the lost worker is restarted. Every step, every group complete,
  none duplicated, nothing trained on more than one version old;
- the reward and reference actors' node lost while another can host them: restarted there,
  the call in flight made again, the run goes on; lost again with none left: the job stops
  within a bounded time, naming the service, its dead node and the last checkpoint;
- `rollout.autoscale` growing the fleet onto a node that joins (weights pushed by broadcast),
  then the learner's node lost: the job stops naming it and the checkpoint, and the same
  submission resumes there."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time

import pytest

from rlfleet.common.metrics import read_metrics
from tests.cluster import BIN, ROOT, start_cluster, stop_cluster
from tests.procs import pids_titled
from tests.services.rule_fixtures import HELD_MARKER, HOLD_MARKER

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
PROMPTS, SAMPLES, STEPS = 4, 4, 24


@pytest.fixture(scope="module")
def cluster():
    # the head holds the services (pinned there: a service placed on a rollout node would take
    # the CPU its engine needs) and each job's driver; the learner has a node of its own
    c = start_cluster(head_cpus=3, head_resources={"services": 2})
    try:
        c.add_node("learner", num_cpus=1, resources={"learner": 1})
        c.add_node("rollout-a", num_cpus=1, resources={"rollout": 1})
        c.add_node("rollout-b", num_cpus=1, resources={"rollout": 1})
        yield c
    finally:
        HOLD_MARKER.unlink(missing_ok=True)
        stop_cluster(c)


def _guide_submit_line() -> str:
    guide = ROOT / "docs" / "guides" / "clusters.md"
    lines = [ln for ln in guide.read_text().splitlines() if ln.startswith("ray job submit ")]
    assert len(lines) == 1, "the clusters guide shows exactly one `ray job submit` line"
    return lines[0]


def test_the_clusters_guides_ray_job_submit_line_runs_a_grpo_job_with_token_auth(cluster, tmp_path):
    # Token auth is really on: a wrong token is refused.
    refused = cluster.ray("job", "list", "--address", cluster.dashboard, env=dict(cluster.env, RAY_AUTH_TOKEN="0" * 32))
    assert refused.returncode != 0 and "Invalid authentication token" in refused.stderr
    env = dict(cluster.env, RAY_ADDRESS=cluster.dashboard, RLFLEET_RUNS=str(tmp_path))
    done = subprocess.run(["bash", "-c", _guide_submit_line()], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    job = re.search(r"Job '(raysubmit_\w+)' (?:submitted|succeeded)", done.stderr + done.stdout)
    assert done.returncode == 0 and job, done.stderr[-3000:]
    assert cluster.status(job.group(1)) == "SUCCEEDED"
    run = tmp_path / "grpo-tiny"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["learner/version"] == r["step"] for r in rows)
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / "learner" / "policy" / "model.safetensors").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2


def test_a_job_whose_reward_code_cannot_score_ends_failed_with_the_message(cluster, tmp_path):
    """A rule that raises: the job's driver exits 2 at the dry call (before any actor starts),
    so Ray marks the job FAILED, and its log names the function and the exception."""
    job = _submit(cluster, "examples/grpo_tiny.yaml", "total_steps=2", f"logging.run_dir={tmp_path}",
                  "reward.rules=[{function: 'tests.services.rule_fixtures:raises'}]")
    assert cluster.wait(job, timeout=300) == "FAILED", cluster.logs(job)
    logs = cluster.logs(job)
    assert "reward.rules[0].function='tests.services.rule_fixtures:raises'" in logs, logs
    assert "RuntimeError: broken reward code" in logs, logs
    assert not (tmp_path / "metrics.jsonl").exists()


def _submit(cluster, *args: str) -> str:
    submitted = subprocess.run([str(BIN / "rlfleet"), "submit", *args, "--address", cluster.dashboard],
                               env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = submitted.stdout.strip().splitlines()[-1]
    assert job.startswith("raysubmit_"), submitted.stdout
    return job


def _placement(cluster) -> dict[str, list[str]]:
    """Alive actor class -> the custom resources of the node each runs on ('head' for none)."""
    nodes = {n["node_id"]: sorted(k for k in n["resources_total"] if k in ("learner", "rollout", "scorer")) or ["head"]
             for n in cluster.state("nodes") if n["state"] == "ALIVE"}
    placed: dict[str, list[str]] = {}
    for actor in cluster.state("actors"):
        if actor["state"] == "ALIVE" and actor["node_id"] in nodes:
            placed.setdefault(actor["class_name"], []).append(nodes[actor["node_id"]][0])
    return placed


def _rows(run) -> list[dict]:
    return read_metrics(run) if (run / "metrics.jsonl").is_file() else []


def _wait(what: str, until, deadline_s: float, cluster, job: str):
    """Poll `until` (cheap) to a deadline; ask for the job's status (a process) every 10 s."""
    deadline, ask = time.monotonic() + deadline_s, time.monotonic() + 10
    while not (value := until()):
        assert time.monotonic() < deadline, f"waited {deadline_s:.0f} s for {what}\n" + cluster.logs(job)
        if time.monotonic() > ask:
            ask += 10
            assert cluster.status(job) in ("PENDING", "RUNNING"), f"while waiting for {what}\n" + cluster.logs(job)
        time.sleep(0.5)
    return value


def _released_until(what: str, until, cluster, job: str, deadline_s: float = 300):
    """The job is held at its scoring (rule_fixtures.HOLD_MARKER) except while the test waits for
    what it must see: its steps take 0.1 s, so unheld it would end before a restarted engine is
    back. Released, polled until `until` holds, held again; its value."""
    HOLD_MARKER.unlink(missing_ok=True)
    try:
        return _wait(what, until, deadline_s, cluster, job)
    finally:
        HOLD_MARKER.touch()


def _engine_pids(cluster) -> set[int]:
    """This cluster's rollout workers that are up: processes titled `ray::VLLMRolloutWorker`
    whose environment holds this cluster's token (the session's own Ray has rollout workers
    too), not still in `__init__`."""
    token = f"RAY_AUTH_TOKEN={cluster.env['RAY_AUTH_TOKEN']}".encode()
    return pids_titled(b"ray::VLLMRolloutWorker", environ_entry=token, unless=b"__init__")


def _kill_one_engine(cluster, rng: random.Random) -> int:
    """SIGKILL the process of one of the job's 2 rollout workers, once both are up; its pid."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        pids = _engine_pids(cluster)
        if len(pids) == 2:
            try:
                os.kill(pid := rng.choice(sorted(pids)), signal.SIGKILL)
                return pid
            except ProcessLookupError:  # the state API lags a restart by a moment
                pass
        time.sleep(0.2)
    raise AssertionError("the 2 rollout workers were never both up")


def _job_args(run_dir, steps: int, services: str = "services") -> list[str]:
    """A GRPO job placed by node resource (the reward and reference actors by `services`), its
    scoring held while HOLD_MARKER exists."""
    return ["examples/grpo_tiny.yaml", f"total_steps={steps}", f"rollout.prompts_per_step={PROMPTS}",
            f"rollout.samples_per_prompt={SAMPLES}", "rollout.max_response_tokens=8",
            "cluster.learner.resources={learner: 1}", "cluster.rollout.resources={rollout: 1}",
            f"cluster.reward.resources={{{services}: 1}}", f"cluster.reference.resources={{{services}: 1}}",
            "logging.eval_every_steps=0", f"logging.run_dir={run_dir}",
            "reward.rules=[{function: 'tests.services.rule_fixtures:math_answer_while_not_held', timeout_s: 900}]"]


def test_a_job_across_nodes_scales_survives_a_killed_engine_and_a_lost_node_and_grows_back(cluster, tmp_path):
    HOLD_MARKER.touch()  # held but where _released_until lets it run
    job = _submit(cluster, *_job_args(tmp_path, STEPS), "rollout.num_workers=1", "rollout.max_staleness=1",
                  "checkpoint.every_steps=0")
    # `rlfleet scale` right after `rlfleet submit`, while the job is still starting: it waits for
    # the job's control actor; the request applies at the next step boundary
    scaled = subprocess.run([str(BIN / "rlfleet"), "scale", job, "--rollout-workers", "2", "--address",
                             cluster.gcs, "--wait-s", "300"],
                            env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert scaled.returncode == 0, scaled.stderr[-3000:] + cluster.logs(job)
    reply = json.loads(scaled.stdout)
    assert reply["last_step"] == 0 and reply["requested_rollout_workers"] == 2, reply
    _released_until("a step with 2 rollout workers", lambda: any(
        r["rollout/num_workers"] == 2.0 for r in _rows(tmp_path)), cluster, job)

    # Placement by node resource, read per actor from Ray's state, once the new engine is up.
    _wait("the second rollout worker up", lambda: len(_placement(cluster).get("VLLMRolloutWorker", [])) == 2,
          300, cluster, job)
    placed = _placement(cluster)
    assert placed["Learner"] == ["learner"], placed
    assert sorted(placed["VLLMRolloutWorker"]) == ["rollout", "rollout"], placed
    assert placed["RewardService"] == ["head"] and placed["ReferenceService"] == ["head"]  # not on rollout nodes

    # One engine's process SIGKILLed: Ray restarts it on its node; it gets the current weights
    # (the next push, or a re-sync when a generate call reaches it first) before its work counts.
    killed = _kill_one_engine(cluster, random.Random(0))
    _wait("the killed engine restarted", lambda: len(_engine_pids(cluster) - {killed}) == 2, 300, cluster, job)
    after = len(_rows(tmp_path))
    _released_until("two steps with the restarted engine", lambda: len(_rows(tmp_path)) >= after + 2, cluster, job)

    # A rollout node lost, as a host is: its raylet and every process on it, SIGKILLed at once.
    killed_after = len(_rows(tmp_path))
    assert cluster.kill_node("rollout-b") >= 2  # the raylet and at least the engine's worker
    down = _released_until("a step run without the lost worker", lambda: next(
        (r for r in _rows(tmp_path) if r["rollout/workers_down"] == 1.0), None), cluster, job)
    assert down["step"] > killed_after and down["rollout/lost_workers"] >= 1.0

    # The node joins again: the worker set aside is restarted there and rejoins, re-synced.
    cluster.add_node("rollout-b2", num_cpus=1, resources={"rollout": 1})
    _wait("the lost worker restarted on the new node",
          lambda: len(_placement(cluster).get("VLLMRolloutWorker", [])) == 2, 300, cluster, job)
    rejoined_after = len(_rows(tmp_path))
    HOLD_MARKER.unlink()
    assert cluster.wait(job, timeout=600) == "SUCCEEDED", cluster.logs(job)

    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step once
    workers = [r["rollout/num_workers"] for r in rows]  # 1 until the request applied, then 2 for good
    assert workers == sorted(workers) and workers[-1] == 2.0 and set(workers) <= {1.0, 2.0}, workers
    for row in rows:  # no group lost or duplicated; pushed weights reached the engines on the other nodes
        assert row["rollout/num_samples"] == PROMPTS * SAMPLES and row["rollout/complete_groups"] == PROMPTS
        assert row["learner/version"] == row["step"]
        assert row["rollout/staleness_max"] <= 1 and row["rollout/refused_stale"] == 0
    # back within a few steps of its restart (the pool's call to it is answered once Ray has told
    # the driver where the restarted actor is), and for good
    back = next((r["step"] for r in rows if r["step"] > rejoined_after and r["rollout/workers_down"] == 0.0), None)
    assert back is not None and back <= rejoined_after + 8, [(r["step"], r["rollout/workers_down"]) for r in rows]
    assert all(r["rollout/workers_down"] == 0.0 for r in rows if r["step"] >= back)
    assert rows[-1]["rollout/resynced"] >= 1.0 and rows[-1]["rollout/lost_workers"] == 1.0

    # A job that does not exist (or has ended) is named in a clear error once the wait is over.
    missing = subprocess.run([str(BIN / "rlfleet"), "scale", "raysubmit_nope", "--rollout-workers", "2",
                              "--address", cluster.gcs, "--wait-s", "1"], env=cluster.env, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "no running rlfleet job 'raysubmit_nope'" in missing.stderr
    assert "did not appear in namespace 'rlfleet' within 1 s" in missing.stderr


def test_the_fleet_autoscales_onto_a_joining_node_then_a_lost_learner_node_stops_the_job_and_it_resumes(
        cluster, tmp_path):
    """One job, two stories (a job's start costs half a minute here).
    Autoscaling (`rollout.autoscale`, up to 3 workers, growing whenever the learner waits): the
    fleet grows from 1 to 2 on the two rollout nodes, wants a third that the cluster has no room
    for (asked of Ray's autoscaler: pending, in the metrics and the log), and grows onto a rollout
    node that joins.
    The learner's node SIGKILLed mid-run: the job ends FAILED within a bounded time, its log
    naming the learner's node (declared dead) and the last complete checkpoint; once a node with
    the `learner` resource joins, the same submission resumes there and completes every step once."""
    steps = 10
    # the weights travel by broadcast here (a gloo group from the learner's node to the engines on
    # the others, re-formed at each push as the fleet grows); the other job's by the object store
    args = [*_job_args(tmp_path, steps), "rollout.num_workers=1", "checkpoint.every_steps=2",
            "rollout.weight_sync=broadcast",
            "rollout.autoscale={enabled: true, max_workers: 3, grow_above: 0.0, every_steps: 1}"]
    HOLD_MARKER.touch()
    job = _submit(cluster, *args)
    pending = _released_until("a third worker pending", lambda: next(
        (r for r in _rows(tmp_path) if r.get("rollout/autoscale_pending") == 1.0), None), cluster, job)
    assert pending["rollout/num_workers"] == 2.0 and pending["rollout/autoscale_target"] == 3.0
    cluster.add_node("rollout-c", num_cpus=1, resources={"rollout": 1})
    grown = _released_until("the fleet grown onto the new node", lambda: next(
        (r for r in _rows(tmp_path) if r["rollout/num_workers"] == 3.0), None), cluster, job)
    assert grown["rollout/autoscale_pending"] == 0.0 and sorted(_placement(cluster)["VLLMRolloutWorker"]) == ["rollout"] * 3
    logs = cluster.logs(job, tail=None)
    assert "rollout workers 1 -> 2 (the learner waited" in logs and "rollout workers 2 -> 3" in logs, logs[-3000:]
    assert "3 rollout workers wanted (the learner waited" in logs and "the cluster lacks rollout" in logs

    _released_until("step 5 (the checkpoint of step 4 complete)", lambda: len(_rows(tmp_path)) >= 5, cluster, job)
    killed = time.monotonic()
    assert cluster.kill_node("learner") >= 2  # the raylet and at least the learner's worker
    HOLD_MARKER.unlink()
    assert cluster.wait(job, timeout=300) == "FAILED", cluster.logs(job)
    took = time.monotonic() - killed
    logs = cluster.logs(job, tail=None)
    latest = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file())[-1]
    assert "the learner was lost at step" in logs and ", dead)" in logs, logs[-3000:]
    assert f"The last complete checkpoint is {tmp_path / 'checkpoints' / latest}" in logs, logs[-3000:]
    # Ray declares the node dead (this cluster's health checks: ~5 s; Ray's defaults: ~15-30 s),
    # the step in flight fails, the learner is found gone, the job ends
    assert took < 90, took

    cluster.add_node("learner-2", num_cpus=1, resources={"learner": 1})
    again = _submit(cluster, *args)  # the same command
    assert cluster.wait(again, timeout=600) == "SUCCEEDED", cluster.logs(again)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # resumed: every step once
    assert all(r["learner/version"] == r["step"] and r["rollout/complete_groups"] == PROMPTS for r in rows)
    # every engine, the ones added by autoscaling too, generated with the weights just broadcast
    assert all(r["rollout/min_version"] == r["rollout/max_version"] == r["step"] for r in rows)
    assert f"resumed from {tmp_path / 'checkpoints' / latest}" in cluster.logs(again, tail=None)


def test_a_lost_services_node_moves_them_to_another_and_with_none_left_the_job_stops_naming_them(cluster, tmp_path):
    """The reward and reference actors on a node of their own (resource `scorer`). That node
    SIGKILLed while the reward call is in flight and a second `scorer` node is up: Ray restarts
    both there, the call is made again, every step trains once. The second node lost too, with
    no node left that offers `scorer`: the job ends FAILED (exit 4) within a bounded time, its
    log naming the service, its dead node and the last complete checkpoint."""
    cluster.add_node("scorer-1", num_cpus=2, resources={"scorer": 2})
    HOLD_MARKER.touch()
    job = _submit(cluster, *_job_args(tmp_path, 40, services="scorer"), "rollout.num_workers=1",
                  "checkpoint.every_steps=2", "cluster.service_lost_wait_s=5")
    _released_until("step 3", lambda: len(_rows(tmp_path)) >= 3, cluster, job)
    placed = _placement(cluster)
    assert placed["RewardService"] == ["scorer"] and placed["ReferenceService"] == ["scorer"], placed
    cluster.add_node("scorer-2", num_cpus=2, resources={"scorer": 2})
    _wait("a reward call held in flight", lambda: HELD_MARKER.exists() and
          HELD_MARKER.stat().st_mtime >= HOLD_MARKER.stat().st_mtime, 120, cluster, job)
    before = len(_rows(tmp_path))
    assert cluster.kill_node("scorer-1") >= 2  # held: the reward's call is in flight on that node
    moved = _released_until("two steps with the services restarted on the other node", lambda: next(
        (r for r in _rows(tmp_path) if r["step"] >= before + 2), None), cluster, job)
    assert moved["services/retries"] >= 1.0, moved  # the call in flight made again after the restart
    placed = _placement(cluster)
    assert placed["RewardService"] == ["scorer"] and placed["ReferenceService"] == ["scorer"], placed

    killed = time.monotonic()
    assert cluster.kill_node("scorer-2") >= 2
    HOLD_MARKER.unlink()
    assert cluster.wait(job, timeout=300) == "FAILED", cluster.logs(job)
    took = time.monotonic() - killed
    logs = cluster.logs(job, tail=None)
    assert "actor's node" in logs and "is dead and no live node can host it (it needs" in logs, logs[-3000:]
    assert "'scorer': 1.0" in logs and "The last complete checkpoint is" in logs, logs[-3000:]
    # Ray declares the node dead (~5 s here), a call waits service_lost_wait_s (5 s) for a node
    assert took < 90, took
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) < 40

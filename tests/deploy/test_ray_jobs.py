"""Cluster use on a real local Ray head with token authentication on 127.0.0.1: the clusters
guide's `ray job submit` line (docs/guides/clusters.md) runs a 2-step GRPO job to SUCCEEDED; `rlfleet scale` grows a submitted
job's rollout fleet from 1 to 2 workers at the next step boundary, and the job survives its
workers being SIGKILLed every few steps."""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlfleet.common.metrics import read_metrics
from tests.ports import free_port
from tests.procs import pids_titled
from tests.services.rule_fixtures import HOLD_MARKER

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class Head:
    def __init__(self, env: dict[str, str], gcs: str, dashboard: str, proc: subprocess.Popen):
        self.env, self.gcs, self.dashboard, self.proc = env, gcs, dashboard, proc

    def ray(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def status(self, job: str) -> str:
        """The job's status through Ray's job SDK, in a process that holds the token."""
        code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
                "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
        out = subprocess.run([sys.executable, "-c", code, self.dashboard, job], env=self.env, capture_output=True,
                             text=True, timeout=60)
        return out.stdout.strip() or f"UNKNOWN: {out.stderr[-500:]}"

    def wait(self, job: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
            time.sleep(2)
        return status

    def logs(self, job: str) -> str:
        return self.ray("job", "logs", job, "--address", self.dashboard).stdout[-4000:]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with RAY_AUTH_MODE=token and a fresh token; every
    port chosen free (another Ray may run beside it); stopped by terminating the block."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PATH=f"{BIN}:{env['PATH']}")
    gcs, dash = free_port(), free_port()
    ports = {flag: free_port() for flag in ("ray-client-server-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=6",
           f"--temp-dir={temp}", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    head = Head(env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", proc)
    try:
        deadline = time.monotonic() + 120
        while head.ray("job", "list", "--address", head.dashboard).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(2)
        yield head
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        shutil.rmtree(temp, ignore_errors=True)


def guide_submit_line() -> str:
    guide = ROOT / "docs" / "guides" / "clusters.md"
    lines = [ln for ln in guide.read_text().splitlines() if ln.startswith("ray job submit ")]
    assert len(lines) == 1, "the clusters guide shows exactly one `ray job submit` line"
    return lines[0]


def test_the_clusters_guides_ray_job_submit_line_runs_a_grpo_job_with_token_auth(ray_head, tmp_path):
    # Token auth is really on: a wrong token is refused.
    wrong = dict(ray_head.env, RAY_AUTH_TOKEN="0" * 32)
    refused = ray_head.ray("job", "list", "--address", ray_head.dashboard, env=wrong)
    assert refused.returncode != 0 and "Invalid authentication token" in refused.stderr
    env = dict(ray_head.env, RAY_ADDRESS=ray_head.dashboard, RLFLEET_RUNS=str(tmp_path))
    done = subprocess.run(["bash", "-c", guide_submit_line()], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    job = re.search(r"Job '(raysubmit_\w+)' (?:submitted|succeeded)", done.stderr + done.stdout)
    assert done.returncode == 0 and job, done.stderr[-3000:]
    assert ray_head.status(job.group(1)) == "SUCCEEDED"
    run = tmp_path / "grpo-tiny"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["learner/version"] == r["step"] for r in rows)
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / "learner" / "policy" / "model.safetensors").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2


def test_a_job_whose_reward_code_cannot_score_ends_failed_with_the_message(ray_head, tmp_path):
    """A rule that raises: the job's driver exits 2 at the dry call (before any actor starts),
    so Ray marks the job FAILED, and its log names the function and the exception."""
    submitted = subprocess.run(
        [str(BIN / "rlfleet"), "submit", "examples/grpo_tiny.yaml", "total_steps=2", f"logging.run_dir={tmp_path}",
         "--address", ray_head.dashboard, "reward.rules=[{function: 'tests.services.rule_fixtures:raises'}]"],
        env=ray_head.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = submitted.stdout.strip().splitlines()[-1]
    assert ray_head.wait(job, timeout=300) == "FAILED", ray_head.logs(job)
    logs = ray_head.logs(job)
    assert "reward.rules[0].function='tests.services.rule_fixtures:raises'" in logs, logs
    assert "RuntimeError: broken reward code" in logs, logs
    assert not (tmp_path / "metrics.jsonl").exists()


def alive_rollout_pids(head: Head) -> set[int]:
    """PIDs of this head's rollout workers that are up (not restarting): processes titled
    `ray::VLLMRolloutWorker` whose environment holds this head's token (the test session's
    own Ray cluster has rollout workers too)."""
    token = f"RAY_AUTH_TOKEN={head.env['RAY_AUTH_TOKEN']}".encode()
    return pids_titled(b"ray::VLLMRolloutWorker", environ_entry=token, unless=b"__init__")


def kill_one_of_two(ray_head, rng: random.Random, deadline: float) -> None:
    """SIGKILL one of the job's 2 rollout workers, once both are up (not while a killed one is
    still restarting)."""
    while True:
        assert time.monotonic() < deadline, "the 2 rollout workers were never both up"
        pids = alive_rollout_pids(ray_head)
        if len(pids) == 2:
            try:
                os.kill(rng.choice(sorted(pids)), signal.SIGKILL)
                return
            except ProcessLookupError:  # the state API lags a restart by a moment
                pass
        time.sleep(0.2)


def test_a_submitted_job_scaled_to_2_workers_survives_them_killed_every_few_steps(ray_head, tmp_path):
    """`rlfleet scale` right after `rlfleet submit`, while the job is still starting: it waits
    for the job's control actor. The job's scoring is held (rule_fixtures.HOLD_MARKER) until the
    request is in, so the job cannot end before it, however loaded the machine is. Then the soak,
    in the overlapped loop (max_staleness 1: the pool works from its own thread while the
    learner trains): every 4 steps one of the 2 workers, picked at random, is SIGKILLed (3 times, the job held while the kill is
    made). The job
    ends with every step, every step with all its groups complete (none lost or duplicated) and
    nothing trained on more than one version old. (The pool's recovery in the synchronous loop:
    tests/rollout/test_pool.py.)"""
    steps, prompts, samples = 18, 8, 4
    HOLD_MARKER.touch()
    try:
        submitted = subprocess.run(
            [str(BIN / "rlfleet"), "submit", "examples/grpo_tiny.yaml", f"total_steps={steps}",
             f"rollout.prompts_per_step={prompts}", f"rollout.samples_per_prompt={samples}",
             "rollout.max_response_tokens=32", "rollout.max_staleness=1", f"logging.run_dir={tmp_path}",
             "--address", ray_head.dashboard,
             "reward.rules=[{function: 'tests.services.rule_fixtures:math_answer_while_not_held', timeout_s: 900}]"],
            env=ray_head.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job = submitted.stdout.strip().splitlines()[-1]
        assert job.startswith("raysubmit_")
        scaled = subprocess.run([str(BIN / "rlfleet"), "scale", job, "--rollout-workers", "2", "--address",
                                 ray_head.gcs, "--wait-s", "300"],
                                env=ray_head.env, cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert scaled.returncode == 0, scaled.stderr[-3000:] + ray_head.logs(job)
    finally:
        HOLD_MARKER.unlink(missing_ok=True)
    reply = json.loads(scaled.stdout)
    assert reply["last_step"] == 0 and reply["requested_rollout_workers"] == 2, reply
    rng = random.Random(0)
    kills, next_kill = 0, 3
    deadline = time.monotonic() + 420
    done = 0
    while done < steps:  # watch the metrics file (cheap); ask for the job's status only now and then
        assert time.monotonic() < deadline, ray_head.logs(job)
        done = len(read_metrics(tmp_path)) if (tmp_path / "metrics.jsonl").is_file() else 0
        if kills < 3 and next_kill <= done:
            # The overlapped loop's steps are short, and a machine under load restarts a worker
            # slowly: the job is held at its next scoring until the kill is made, so that every
            # kill lands mid-run however fast or slow the steps are.
            HOLD_MARKER.touch()
            try:
                kill_one_of_two(ray_head, rng, deadline)
            finally:
                HOLD_MARKER.unlink(missing_ok=True)
            kills += 1
            next_kill = done + 4
        elif int(time.monotonic()) % 15 == 0:
            assert ray_head.status(job) == "RUNNING", ray_head.logs(job)
        time.sleep(0.2)
    assert ray_head.wait(job, timeout=120) == "SUCCEEDED", ray_head.logs(job)
    assert kills == 3
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # The request applies at a step boundary: before step 1 when it came before the driver first
    # reported (rollout_workers 0 in the reply), else while step 1 was held, so before step 2;
    # the pool's thread runs it after the generate calls queued before it.
    first_two = 1 if reply["rollout_workers"] == 0 else 2
    workers = [r["rollout/num_workers"] for r in rows]
    assert workers == sorted(workers) and set(workers[first_two:]) == {2.0}, (reply, workers)
    for row in rows:
        assert row["rollout/num_samples"] == prompts * samples and row["rollout/complete_groups"] == prompts
        assert row["learner/version"] == row["step"]
        assert row["rollout/staleness_max"] <= 1 and row["rollout/refused_stale"] == 0
    # Every killed worker came back (restarted by Ray) and was re-synced before it got work.
    assert rows[-1]["rollout/resynced"] >= kills
    # A job that does not exist (or has ended) is named in a clear error once the wait is over.
    missing = subprocess.run([str(BIN / "rlfleet"), "scale", "raysubmit_nope", "--rollout-workers", "2",
                              "--address", ray_head.gcs, "--wait-s", "1"], env=ray_head.env, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "no running rlfleet job 'raysubmit_nope'" in missing.stderr
    assert "did not appear in namespace 'rlfleet' within 1 s" in missing.stderr


def test_a_scale_request_the_cluster_cannot_place_is_refused_with_the_numbers(ray_cluster):
    from rlfleet.common.config import RoleResources
    from rlfleet.deploy.loop.scaling import missing_resources

    assert missing_resources(RoleResources(num_cpus=0), 3) == ""
    short = missing_resources(RoleResources(num_cpus=1, resources={"rollout": 1}), 2)
    assert short.startswith("rollout 2 (free 0)")
    assert "CPU 1000 (free" in missing_resources(RoleResources(num_cpus=1000), 1)

"""`rlfleet submit` and `rlfleet scale`: a Ray job for a config, and resizing its rollout fleet.

    rlfleet submit CONFIG [key.path=value ...] [--address URL] [--working-dir DIR] [--wait]
    rlfleet scale JOB --rollout-workers K [--address ADDRESS]

`submit` validates the config here (a bad one exits 2 before anything is sent), then submits
`python -m rlfleet.deploy.app.job CONFIG ...` with the runtime environment of
`deploy/cluster/runtime_env.yaml` and prints the job's submission id. `scale` leaves a request
with the job's control actor (`deploy/app/control.py`); the driver applies it at the next step
boundary. Ray's token authentication is honoured as Ray does it (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from rlfleet.deploy.app.control import NAMESPACE, ControlStatus, find_control

RUNTIME_ENV_FILE = Path(__file__).resolve().parents[1] / "cluster" / "runtime_env.yaml"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def runtime_env(working_dir: str) -> dict:
    """`deploy/cluster/runtime_env.yaml` with the working directory to upload."""
    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text())
    return {**env, "working_dir": working_dir}


def entrypoint(config: str, overrides: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "rlfleet.deploy.app.job", config, *overrides])


def submit(config: str, overrides: Sequence[str], address: str | None, working_dir: str) -> str:
    """Submit the job; returns its submission id. `config` is relative to `working_dir`."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD)
    return client.submit_job(entrypoint=entrypoint(config, overrides), runtime_env=runtime_env(working_dir))


def wait(job: str, address: str | None, timeout_s: float = 24 * 3600.0) -> str:
    """Block until the job ends; returns its final status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job).value)
        if status in TERMINAL:
            return status
        time.sleep(2.0)
    raise TimeoutError(f"job {job} still running after {timeout_s:g} s")


def scale(job: str, rollout_workers: int, address: str | None, wait_s: float = 60.0) -> ControlStatus:
    """Ask job `job` for `rollout_workers` rollout workers (from any process that can join the
    cluster: a node of it, or `ray job submit -- rlfleet scale ...`); a job still starting is
    waited for up to `wait_s`."""
    import ray

    if address is None and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        os.environ.pop("RAY_ADDRESS")  # a dashboard URL, for the jobs API; join the local node instead
    ray.init(address=address or "auto", namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
    try:
        control = find_control(job, wait_s)
        try:
            return ray.get(control.request_rollout_workers.remote(rollout_workers), timeout=60)
        except ray.exceptions.GetTimeoutError:
            raise LookupError(f"job {job!r}: its control actor did not answer the request within 60 s") from None
    finally:
        ray.shutdown()

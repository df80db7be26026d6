"""A real multi-node Ray cluster on this machine: a head and worker nodes, each its own raylet
with its own object store and resources (`ray start --address …`), token authentication on
127.0.0.1, every port chosen free. A node is killed as a lost host is: its raylet and every
process it started, SIGKILLed at once (each node runs in its own session)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.ports import free_port

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _agent_ports() -> list[str]:
    return [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port")]


@dataclass
class Cluster:
    env: dict[str, str]
    gcs: str
    dashboard: str
    temp: str
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def ray(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def status(self, job: str) -> str:
        """A submitted job's status through Ray's job SDK, in a process that holds the token."""
        code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
                "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
        out = subprocess.run([str(BIN / "python"), "-c", code, self.dashboard, job], env=self.env,
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or f"UNKNOWN: {out.stderr[-500:]}"

    def wait(self, job: str, timeout: float = 600) -> str:
        """The job's status once it has ended (or the last one seen when `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while (status := self.status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
            time.sleep(2)
        return status

    def logs(self, job: str, tail: int | None = 4000) -> str:
        """The job's log (its last `tail` characters; None: all of it)."""
        out = self.ray("job", "logs", job, "--address", self.dashboard).stdout
        return out if tail is None else out[-tail:]

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        """`ray start --address` a worker node (blocking in its own session) and wait until the
        cluster counts it."""
        import json

        before = self.alive_nodes()
        cmd = [str(BIN / "ray"), "start", "--block", f"--address={self.gcs}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources or {})}", "--disable-usage-stats",
               *_agent_ports()]
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + 120
        while self.alive_nodes() <= before:
            assert self.nodes[name].poll() is None and time.monotonic() < deadline, f"node {name} did not join"
            time.sleep(1)

    def alive_nodes(self) -> int:
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run([sys.executable, "-c", code, self.gcs], env=self.env, capture_output=True, text=True,
                             timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def kill_node(self, name: str) -> int:
        """SIGKILL the node's raylet and every process of its session (its actors' workers too);
        the number of processes killed."""
        sid = self.nodes[name].pid  # the session leader: `ray start --block`
        pids = [int(p) for p, s in (line.split() for line in subprocess.run(
            ["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout.splitlines()) if int(s) == sid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes.pop(name).wait(timeout=30)
        return len(pids)

    def stop(self) -> None:
        for name in list(self.nodes):
            self.kill_node(name)


def start_cluster(head_cpus: int = 2, head_resources: dict[str, float] | None = None) -> Cluster:
    """A head node with token auth; `Cluster.add_node` adds workers."""
    import json

    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PATH=f"{BIN}:{env['PATH']}",
               PYTHONPATH=str(ROOT),
               # a lost node declared dead after ~5 s of failed health checks, not Ray's ~15-30 s
               # (the GCS reads these; a loaded 2-core machine still answers a check within 3 s)
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="3000",
               RAY_health_check_failure_threshold="5")
    gcs, dash = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--num-cpus={head_cpus}", f"--resources={json.dumps(head_resources or {})}", f"--temp-dir={temp}",
           "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", *_agent_ports()]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cluster = Cluster(env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", temp, {"head": head})
    deadline = time.monotonic() + 120
    while cluster.ray("job", "list", "--address", cluster.dashboard).returncode != 0:
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
        time.sleep(2)
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.temp, ignore_errors=True)

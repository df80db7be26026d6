"""A real multi-node Ray cluster on this machine: a head and worker nodes, each its own raylet
with its own object store and resources (`ray start --address …`), token authentication on
127.0.0.1, every port chosen free. A node is killed as a lost host is: its raylet and every
process it started, SIGKILLed at once (each node runs in its own session)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
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

    def get(self, path: str):
        """The dashboard's HTTP API (jobs, state), with the token: no process started per query
        (a `ray` CLI call costs a core-second or more, which a 2-core machine's jobs feel)."""
        request = urllib.request.Request(self.dashboard + path,
                                         headers={"authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def state(self, kind: str) -> list[dict]:
        """Ray's state API: `nodes` or `actors` of the cluster, dead ones too."""
        return self.get(f"/api/v0/{kind}?limit=10000")["data"]["result"]["result"]

    def serves_jobs(self) -> bool:
        try:
            return isinstance(self.get("/api/jobs/"), list)
        except (OSError, ValueError):
            return False

    def status(self, job: str) -> str:
        """A submitted job's status."""
        try:
            return self.get(f"/api/jobs/{job}")["status"]
        except (OSError, ValueError, KeyError) as err:
            return f"UNKNOWN: {err}"

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
        before = self.alive_nodes()
        cmd = [str(BIN / "ray"), "start", "--block", f"--address={self.gcs}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources or {})}", "--disable-usage-stats",
               *_agent_ports()]
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + 120
        while self.alive_nodes() <= before:
            assert self.nodes[name].poll() is None and time.monotonic() < deadline, f"node {name} did not join"
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        deadline = time.monotonic() + 60
        while True:  # the state API answers a few seconds after the dashboard does
            try:
                return sum(n["state"] == "ALIVE" for n in self.state("nodes"))
            except (OSError, ValueError, KeyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

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
    while not cluster.serves_jobs() or cluster.alive_nodes() < 1:  # the state API lists the head a moment later
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
        time.sleep(0.5)
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.temp, ignore_errors=True)

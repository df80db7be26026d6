"""No false alarm from the run-health checks on the full built-in demos, run as a user runs them
(`rlfleet demo`, `--rlhf`, `--agent`): their output holds no `run health` warning and no stop.
Minutes each, so marked `slow` and left out of the suite (`pytest -m slow` runs them); the
shortened demo and RLHF demo are grepped in the suite (tests/deploy/test_demo.py), where a
shortened agent demo cannot stand in: its brief SFT leaves every early group at reward 0, and
the zero-spread warning then rightly fires."""

from __future__ import annotations

import subprocess

import pytest

from tests.cluster import BIN, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]


@pytest.mark.parametrize("flag", ["", "--rlhf", "--agent"])
def test_the_full_demo_prints_no_run_health_warning(tmp_path, flag):
    done = subprocess.run([str(BIN / "rlfleet"), "demo", *([flag] if flag else []), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "run health" not in output, [line for line in output.splitlines() if "run health" in line]
    assert "finished in" in done.stdout

"""The documentation: a short README, reference pages generated from the code and current, and
a quickstart whose commands run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet.common.config import RunConfig
from rlfleet.common.metric_names import METRICS, STAGE_METRICS, describe
from scripts.gen_reference import config_rows
from scripts.gen_reference import main as gen_reference

ROOT = Path(__file__).resolve().parents[1]
SETUP = "bash scripts/setup.sh && .venv/bin/rlfleet demo"
TESTS = ".venv/bin/python -m pytest"


@pytest.mark.unit
def test_the_readme_is_short_and_keeps_its_two_commands_on_top():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.DOTALL)
    assert blocks[:2] == [SETUP, TESTS]  # .ci/run calls these two verbatim
    ci = (ROOT / ".ci" / "run").read_text()
    assert SETUP in ci and TESTS in ci
    quickstart = (ROOT / "docs" / "quickstart.md").read_text()  # the README's first run is the quickstart's, tested
    for block in [*blocks[2:], *re.findall(r"```python\n(.*?)\n```", text, flags=re.DOTALL)]:
        assert block in quickstart, block


@pytest.mark.unit
def test_the_reference_pages_are_generated_from_the_current_code():
    assert gen_reference(["--check"]) == 0, "run .venv/bin/python scripts/gen_reference.py"
    config = (ROOT / "docs" / "reference" / "config.md").read_text()
    for path, *_ in config_rows(RunConfig):
        assert f"| `{path}` |" in config, path
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    for command in ("demo", "smoke", "train", "eval", "sft", "rm", "dpo", "submit", "scale", "plan", "config check",
                    "config schema", "tiny-model"):
        assert f"## `rlfleet {command}`" in cli, command
    metrics = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    for name in [*METRICS, *STAGE_METRICS]:
        assert f"| `{name}` |" in metrics, name
    assert describe("rollout_corr/rollout_rs_seq_mean_k1_masked_fraction") and describe("timing/train")
    assert describe("no/such/metric") is None


@pytest.mark.unit
def test_every_test_the_docs_cite_exists():
    """A guide's "Tested:" column names tests by path::name; a renamed or moved test is caught here."""
    cited = {m for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
             for m in re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", doc.read_text())}
    assert cited
    missing = [f"{path}::{name}" for path, name in sorted(cited)
               if not (ROOT / path).is_file() or f"def {name}(" not in (ROOT / path).read_text()]
    assert not missing, missing


def _quickstart_commands() -> list[str]:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    bash = [c.strip() for block in re.findall(r"```bash\n(.*?)\n```", text, flags=re.DOTALL) for c in block.splitlines()]
    python = re.findall(r"```python\n(.*?)\n```", text, flags=re.DOTALL)
    assert bash[0] == SETUP  # run by CI as the README's first command
    return [*bash[1:], *(f"{sys.executable} -c {shlex.quote(p)}" for p in python)]


@pytest.mark.ray
@pytest.mark.vllm
def test_every_quickstart_command_runs(tmp_path):
    """Each command of docs/quickstart.md after the install, as written, in a folder that has the
    repository's examples and .venv (each run starts its own local Ray)."""
    for name in ("examples", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    commands = _quickstart_commands()
    assert len(commands) == 3
    # at once, as independent commands (each its own local Ray and run folder): a run's start-up
    # waits on process starts and imports that the other's fill
    logs = [tmp_path / f"command{i}.log" for i in range(len(commands))]
    running = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as out:
            running.append(subprocess.Popen(command, shell=True, cwd=tmp_path, env=env, stdout=out,
                                            stderr=subprocess.STDOUT))
    for command, proc, log in zip(commands, running, logs, strict=True):
        assert proc.wait(timeout=600) == 0, f"{command}\n{log.read_text()[-3000:]}"
    rows = [json.loads(line) for line in (tmp_path / "runs" / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(describe(name) for row in rows for name in row if name != "step")

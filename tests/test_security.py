"""Loading never runs code or unpickles data that came with a model or a checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rlfleet.common.config import LoraConfig
from rlfleet.common.tiny_models import build_tiny_causal_lm, build_tiny_reward_model
from rlfleet.learner.models import load_critic, load_policy
from rlfleet.services.reference import ReferenceService
from rlfleet.services.reward_model import RewardModelScorer

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("common", "learner", "rollout", "services", "deploy")


def with_custom_code(folder: Path, marker: Path, classes: list[str]) -> Path:
    """A model folder whose config asks transformers to run the folder's own `evil.py`, which
    would leave `marker` behind if it were ever imported."""
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {name: f"evil.{name}" for name in ["AutoConfig", *classes]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_models_that_ship_their_own_code_never_run_it(tmp_path):
    marker = tmp_path / "remote-code-ran"
    policy = with_custom_code(build_tiny_causal_lm(tmp_path / "policy", seed=0), marker,
                              ["AutoModelForCausalLM", "AutoModelForTokenClassification"])
    reward = with_custom_code(build_tiny_reward_model(tmp_path / "reward", seed=1), marker,
                              ["AutoModelForSequenceClassification"])
    cpu = torch.device("cpu")
    loaded = [
        load_policy(str(policy), LoraConfig(), cpu),
        load_critic(str(policy), cpu),
        ReferenceService(str(policy)),
        RewardModelScorer(str(reward)),
    ]
    assert len(loaded) == 4 and not marker.exists()
    assert type(loaded[0]).__module__.startswith("transformers.models.")  # the library's own class


def package_sources() -> list[Path]:
    return [p for d in PACKAGE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"trust_remote_code\s*=\s*True", "runs code shipped with a model"),
        (r"^\s*(import pickle|from pickle import|import cloudpickle|import dill)", "unpickling runs code"),
        (r"torch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load unpickles unless weights_only=True"),
        (r"np\.load\([^)]*allow_pickle\s*=\s*True", "unpickles"),
    ],
)
def test_nothing_in_the_package_unpickles_or_trusts_remote_code(pattern, why):
    sources = package_sources()
    assert len(sources) > 30
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, f"{why}: {hits}"

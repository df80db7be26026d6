"""Data and reward code as users bring them, through `rlfleet train`, with no change to their
files: a verl RL parquet with a verl `compute_score` file, a TRL conversational dataset saved
with `datasets`' save_to_disk (train and test splits) with a TRL batch reward function, and an
OpenRLHF JSONL with an OpenRLHF `reward_func` (a hub-cache parquet snapshot is read in
tests/common/test_data.py). The task in each: answer with as many copies of a letter as
possible (the tiny model's reward starts ~0.02)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlfleet.common.config_io import dump_config
from rlfleet.common.metrics import read_metrics
from rlfleet.deploy.app import cli
from tests.deploy.test_training import ROOT, grpo_config

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
REWARDS = "tests/fixtures/user_rewards"
LETTERS = "abcde"


def _question(i: int) -> tuple[str, str]:
    letter = LETTERS[i % len(LETTERS)]
    return f"Write the letter {letter} many times.", letter


def verl_parquet(root: Path) -> dict:
    rows = [{"data_source": "letters", "prompt": [{"role": "user", "content": q}], "ability": "letters",
             "reward_model": {"style": "rule", "ground_truth": letter}, "extra_info": {"split": "train", "index": i}}
            for i, (q, letter) in enumerate(map(_question, range(40)))]
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    return {"data": {"train_path": str(root / "train.parquet")},
            "reward": {"rules": [{"function": f"{REWARDS}/verl_reward.py:compute_score"}]}}


def trl_saved_to_disk(root: Path) -> dict:
    """A conversational prompt dataset as TRL users keep one: a DatasetDict on disk."""
    rows = [{"prompt": [{"role": "user", "content": q}], "target": letter} for q, letter in map(_question, range(40))]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:8])}).save_to_disk(str(root / "letters"))
    return {"data": {"train_path": str(root / "letters"), "eval_path": str(root / "letters")},
            "reward": {"rules": [{"function": "tests.fixtures.user_rewards.trl_rewards:letter_share"}]}}


def openrlhf_jsonl(root: Path) -> dict:
    with (root / "prompts.jsonl").open("w") as f:
        for q, letter in map(_question, range(40)):
            f.write(json.dumps({"input": q, "answer": letter}) + "\n")
    return {"data": {"train_path": str(root / "prompts.jsonl"), "format": "openrlhf", "label_key": "answer",
                     "apply_chat_template": True},
            "reward": {"rules": [{"function": f"{REWARDS}/openrlhf_reward.py:reward_func", "timeout_s": 30}]}}


CASES = {"verl": verl_parquet, "trl_save_to_disk": trl_saved_to_disk, "openrlhf": openrlhf_jsonl}


@pytest.mark.parametrize("case", list(CASES))
def test_three_grpo_steps_from_a_users_data_and_reward_code(ray_cluster, tmp_path, case, monkeypatch):
    monkeypatch.chdir(ROOT)  # the reward file paths are relative, as users write them
    (tmp_path / "data").mkdir()
    sections = CASES[case](tmp_path / "data")
    cfg = grpo_config(tmp_path / "run", data={"task": None, "max_prompt_tokens": 96, **sections["data"]},
                      reward=sections["reward"], checkpoint={"every_steps": 0}, reference={"enabled": False},
                      algorithm={"kl_in": "none", "kl_coef": 0.0},
                      logging={"run_dir": str(tmp_path / "run"), "progress_bar": False, "eval_every_steps": 0})
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert cli.main(["train", str(path)]) == 0
    rows = [r for r in read_metrics(tmp_path / "run") if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["reward/unscorable"] == 0.0 and row["learner/updated"] == 1.0, row
        assert 0.0 <= row["reward"] <= 1.0
    if case == "verl":  # the dict's other keys are logged
        assert all(r["reward/logs/rules[0]/split_is_train"] == 1.0 for r in rows)
        assert all(0.0 <= r["reward/logs/rules[0]/has_target"] <= 1.0 for r in rows)
    if case == "openrlhf":  # extra_logs, per response
        assert all(r["reward/logs/rules[0]/response_chars"] > 0 for r in rows)

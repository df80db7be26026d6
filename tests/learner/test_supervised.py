"""The supervised stages on the built-in reverse task, a few steps each, in-process."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlfleet.common.config_io import config_from_dict
from rlfleet.common.metrics import read_metrics
from rlfleet.deploy import cli
from rlfleet.deploy.stages import run_stage
from rlfleet.learner.supervised import Demonstration, StageSettings, minibatches, sft

pytestmark = pytest.mark.unit


def stage_config(tmp_path, **sections):
    base = {"data": {"task": "reverse", "task_size": 256}, "logging": {"run_dir": str(tmp_path)}}
    return config_from_dict({**base, **sections})


def test_minibatches_are_seeded_epochs():
    batches = list(minibatches(10, 4, 5, seed=1))
    flat = [i for b in batches for i in b]
    assert all(len(b) == 4 for b in batches)
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    assert batches == list(minibatches(10, 4, 5, seed=1))


def test_sft_loss_counts_response_tokens_only(tiny_model_dir, tmp_path):
    """The SFT loss is the mean NLL of the response tokens (EOS included); prompt tokens are
    context, not targets."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    demo = Demonstration([5, 6, 7, 8], [9, 10, 2])
    ids = torch.tensor([demo.prompt_ids + demo.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, 3:-1]
    expected = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(demo.response_ids)[:, None]).mean().item()
    rows = []
    sft(str(tiny_model_dir), tmp_path / "out", [demo], [demo], StageSettings(steps=1, lr=1e-3, batch_size=1),
        log=rows.append)
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_sft_stage_learns_and_saves_an_hf_folder(tmp_path):
    result = run_stage(stage_config(tmp_path, sft={"steps": 40, "eval_size": 50}), "sft")
    assert result["after/loss"] < result["before/loss"] - 1.0
    assert result["after/token_accuracy"] > result["before/token_accuracy"] + 0.2
    model = AutoModelForCausalLM.from_pretrained(result["output"])  # transformers loads it
    assert model.config.vocab_size == 100
    assert len(read_metrics(tmp_path / "sft")) == 40


def test_reward_model_stage_ranks_held_out_pairs_better(tmp_path):
    """From an SFT'd backbone, 60 Bradley–Terry steps lift held-out pairwise accuracy; the saved
    folder is a one-label sequence classifier (LoRA merged)."""
    sft_out = run_stage(stage_config(tmp_path, sft={"steps": 60}), "sft")["output"]
    cfg = stage_config(tmp_path, rm={"steps": 60, "lr": 1e-3, "init_from": sft_out, "lora_rank": 8})
    result = run_stage(cfg, "rm")
    assert result["after/loss"] < result["before/loss"]
    assert result["after/accuracy"] >= result["before/accuracy"] + 0.1
    rm = AutoModelForSequenceClassification.from_pretrained(result["output"])
    assert rm.config.num_labels == 1 and not any("lora" in n for n, _ in rm.named_parameters())


def test_dpo_stage_raises_the_held_out_margin_via_cli(tmp_path, capsys):
    """Easy negatives (every letter redrawn) for a short run; the held-out generation accuracy
    by the task's checker is reported before and after (the untrained model's is 0)."""
    args = ["dpo", "data.task=reverse", "data.task_size=256", f"logging.run_dir={tmp_path}",
            "dpo.steps=40", "dpo.lr=3e-3", "dpo.eval_size=40", "dpo.negatives=[random]", "data.eval_size=20"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["before/margin"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own reference
    assert result["after/margin"] > 0.5 and result["after/accuracy"] > 0.8
    assert result["after/accuracy/random"] == result["after/accuracy"]
    assert result["before/gold"] == 0.0 and 0.0 <= result["after/gold"] <= 1.0


def test_a_task_without_answers_needs_a_data_file(tmp_path):
    from rlfleet.common.data import DataError

    with pytest.raises(DataError, match=r"data.task='char_fraction' has no reference answers.*sft.data_path"):
        run_stage(stage_config(tmp_path, data={"task": "char_fraction"}), "sft")


def test_stage_data_from_jsonl_names_a_missing_field(tmp_path):
    rows = [{"prompt": f"p{i}", "response": "r"} for i in range(5)] + [{"prompt": "p", "answer": "x"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = stage_config(tmp_path, sft={"data_path": str(path), "eval_size": 2, "steps": 1})
    from rlfleet.common.data import DataError

    with pytest.raises(DataError, match=r"d\.jsonl:6: no 'response' field"):
        run_stage(cfg, "sft")

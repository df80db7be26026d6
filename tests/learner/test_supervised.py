"""The supervised stages on the built-in reverse task, a few steps each, in-process."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlfleet.common.config_io import config_from_dict
from rlfleet.common.metrics import read_metrics
from rlfleet.deploy.app import cli
from rlfleet.deploy.app.stages import run_stage
from rlfleet.learner.supervised import Demonstration, StageSettings, lr_factor, minibatches, sft

pytestmark = pytest.mark.unit


def stage_config(tmp_path, **sections):
    base = {"model": {"dtype": "float32"},  # stated: `auto` is bf16 autocast on a CPU with bf16 units
            "data": {"task": "reverse", "task_size": 256}, "logging": {"run_dir": str(tmp_path)}}
    return config_from_dict({**base, **sections})


def test_minibatches_are_seeded_epochs():
    batches = list(minibatches(10, 4, 5, seed=1))
    flat = [i for b in batches for i in b]
    assert all(len(b) == 4 for b in batches)
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    assert batches == list(minibatches(10, 4, 5, seed=1))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_the_stage_learning_rate_warms_up_then_follows_its_schedule(schedule):
    settings = StageSettings(steps=12, lr=1.0, batch_size=1, schedule=schedule, warmup_steps=3)
    factors = [lr_factor(i, settings) for i in range(settings.steps)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # warm-up, then the peak
    after = factors[3:]
    assert all(b <= a for a, b in zip(after, after[1:], strict=False))  # never rises again
    if schedule == "constant":
        assert after == [1.0] * len(after)
    else:  # decays from the peak towards zero by the last step (k = 0 … 8 of 9 decay steps)
        assert 0 < after[-1] < 0.12
        if schedule == "linear":  # equal decrements
            assert [a - b for a, b in zip(after, after[1:], strict=False)] == pytest.approx([1 / 9] * 8)
        else:  # a half cosine: symmetric about one half, slow at both ends
            assert [a + b for a, b in zip(after, reversed(after + [0.0]), strict=False)] == pytest.approx([1.0] * 9)
            assert after[0] - after[1] < after[4] - after[5]
    with pytest.raises(ValueError, match="schedule 'step'"):
        lr_factor(5, StageSettings(steps=12, lr=1.0, batch_size=1, schedule="step"))


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


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    """A briefly SFT'd policy (60 steps), shared by the tests that start from one."""
    run_dir = tmp_path_factory.mktemp("sft")
    return run_stage(stage_config(run_dir, sft={"steps": 60}), "sft")["output"]


def test_reward_model_stage_ranks_held_out_pairs_better(tmp_path, sft_folder):
    """From an SFT'd backbone, 120 Bradley–Terry steps lift held-out pairwise accuracy; the saved
    folder is a one-label sequence classifier (LoRA merged)."""
    cfg = stage_config(tmp_path, rm={"steps": 120, "lr": 1e-3, "init_from": sft_folder, "lora_rank": 8})
    result = run_stage(cfg, "rm")
    assert result["after/loss"] < result["before/loss"]
    assert result["after/accuracy"] >= result["before/accuracy"] + 0.1
    rm = AutoModelForSequenceClassification.from_pretrained(result["output"])
    assert rm.config.num_labels == 1 and not any("lora" in n for n, _ in rm.named_parameters())


def test_reward_model_stage_with_the_lm_regulariser_a_schedule_and_the_policys_own_mistakes(tmp_path, sft_folder):
    """`rm.lm_coef` trains the language-model loss on the chosen answers beside the ranking (its
    held-out value falls; no language-model head is saved); the learning rate follows the
    schedule; `sampled` negatives come from `sample_from` and are reported as their own kind."""
    cfg = stage_config(tmp_path, rm={"steps": 20, "lr": 1e-3, "init_from": sft_folder, "sample_from": sft_folder,
                                     "lr_schedule": "cosine", "warmup_steps": 4, "lm_coef": 0.5,
                                     "negatives": ["one_wrong", "sampled"]})
    result = run_stage(cfg, "rm")
    assert result["after/lm_loss"] < result["before/lm_loss"] - 0.1
    assert {"after/accuracy/sampled", "after/accuracy/one_wrong"} <= set(result)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "rm")]
    assert lrs[0] == pytest.approx(2e-4) and max(lrs) == pytest.approx(1e-3) and lrs[-1] < 2e-5
    saved = AutoModelForSequenceClassification.from_pretrained(result["output"])
    assert not any("lm_head" in n for n, _ in saved.named_parameters())


def test_sampled_negatives_are_the_models_own_wrong_answers(tmp_path, sft_folder):
    """`sampled` negatives: distinct wrong answers the model sampled and ended with EOS; rows
    whose samples were all right (or never ended) get a one-wrong-letter near miss instead."""
    import random

    from rlfleet.common.tasks import build_task
    from rlfleet.deploy.app.negatives import policy_mistakes, sampled_negatives

    cfg, sft_out = stage_config(tmp_path), sft_folder
    rows = build_task("reverse", 0, 30, "test").rows
    mistakes = policy_mistakes(cfg, sft_out, rows, wanted=2)
    assert sum(map(len, mistakes)) >= 10  # a briefly trained model errs often at temperature 1
    for row, found in zip(rows, mistakes, strict=True):
        assert len(found) <= 2 and len(set(found)) == len(found) and row["answer"] not in found
    pairs = sampled_negatives(cfg, sft_out, rows, 2, random.Random(0), "test")
    for row, found, got in zip(rows, mistakes, pairs, strict=True):
        assert [r for r, k in got if k == "sampled"] == found  # the same seeded samples
        assert len(got) == 2 and all(r != row["answer"] for r, _ in got)
        assert all(k == "one_wrong" for _, k in got[len(found):])


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

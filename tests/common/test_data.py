"""Prompt data: formats, rendering, length limits, errors that name the place, resumable order."""

from __future__ import annotations

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlfleet.common.data import DataError, PromptSampler, build_dataset, detect_format, read_rows
from rlfleet.common.tasks import build_task

pytestmark = pytest.mark.unit

ROWS = [
    {"prompt": "12+7=", "answer": "19"},
    {"prompt": [{"role": "user", "content": "3+4="}], "answer": "7"},
    {"prompt": "x" * 40, "answer": "long"},
]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_parquet_and_arrow_folder_give_the_same_examples(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    flat = [{"prompt": json.dumps(r["prompt"]) if isinstance(r["prompt"], list) else r["prompt"],
             "answer": r["answer"]} for r in ROWS]
    table = pa.Table.from_pylist(flat)
    pq.write_table(table, tmp_path / "d.parquet")
    folder = tmp_path / "saved"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    jsonl = build_dataset(read_rows(tmp_path / "d.jsonl"), tiny_tokenizer, "prompt", 30)
    for other in (tmp_path / "d.parquet", folder):
        rows = read_rows(other)
        assert [r for _, r in rows] == flat
        assert "row 0" in rows[0][0]
    assert len(jsonl) == 2 and jsonl.dropped_too_long == 1
    text, chat = jsonl.examples
    assert text.prompt_ids == tiny_tokenizer.encode("12+7=", add_special_tokens=False)
    rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "3+4="}],
                                                  add_generation_prompt=True, return_dict=False)
    assert chat.prompt_ids == list(rendered)
    assert tiny_tokenizer.decode(chat.prompt_ids) == "User: 3+4=\nAssistant: "
    # every field travels to the reward functions as it is, the prompt too (TRL's get the messages)
    assert text.extra == {"prompt": "12+7=", "answer": "19"}
    assert chat.extra["prompt"] == [{"role": "user", "content": "3+4="}]


def test_long_prompts_can_be_an_error_naming_the_line(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"d\.jsonl:3: the prompt has 40 tokens; data\.max_prompt_tokens is 30"):
        build_dataset(read_rows(tmp_path / "d.jsonl"), tiny_tokenizer, "prompt", 30, on_long_prompt="error")


@pytest.mark.parametrize(("text", "message"), [
    ('{"prompt": "ok"}\n{"prompt": \n', r"d\.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n[1, 2]\n', r"d\.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "ok"}\n\n{"question": "no prompt"}\n', r"d\.jsonl:3: no 'prompt' field \(data\.prompt_key\); fields: \['question'\]"),
    ('{"prompt": 5}\n', r"d\.jsonl:1: 'prompt' must be text or a list of chat messages"),
    ('{"prompt": ""}\n', r"d\.jsonl:1: the prompt is empty"),
])
def test_bad_rows_name_file_and_line(tmp_path, tiny_tokenizer, text, message):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(DataError, match=message):
        build_dataset(read_rows(tmp_path / "d.jsonl"), tiny_tokenizer, "prompt", 100)


def test_missing_files_and_empty_datasets_are_named(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="needs the .arrow files"):
        read_rows(tmp_path / "empty")
    write_jsonl(tmp_path / "d.jsonl", [ROWS[2]])
    with pytest.raises(DataError, match=r"no usable prompts \(1 longer than data\.max_prompt_tokens=30\)"):
        build_dataset(read_rows(tmp_path / "d.jsonl"), tiny_tokenizer, "prompt", 30, source="d.jsonl")


def test_sampler_is_seeded_per_epoch_and_resumes_exactly():
    a = PromptSampler(10, seed=3)
    batches = [a.next_batch(4) for _ in range(5)]  # 20 draws: two whole epochs
    first, second = batches[0] + batches[1] + batches[2][:2], batches[2][2:] + batches[3] + batches[4]
    assert sorted(first) == sorted(second) == list(range(10))  # each epoch is a permutation
    assert first != second  # reshuffled per epoch
    assert PromptSampler(10, seed=3).next_batch(20) == first + second  # deterministic by seed
    assert PromptSampler(10, seed=4).next_batch(10) != first
    b = PromptSampler(10, seed=3)
    b.next_batch(7)
    state = json.loads(json.dumps(b.state_dict()))
    c = PromptSampler(10, seed=3)
    c.load_state_dict(state)
    assert c.next_batch(13) == b.next_batch(13) == (first + second)[7:]
    assert PromptSampler(10, seed=0, shuffle=False).next_batch(12) == [*range(10), 0, 1]
    with pytest.raises(DataError, match="for 10 prompts; the data now has 11"):
        PromptSampler(11, seed=3).load_state_dict(state)


def test_built_in_tasks_are_deterministic_and_carry_their_checker():
    t1, t2 = build_task("addition", 0, 5), build_task("addition", 0, 5)
    assert t1 == t2 and t1.rule == "rlfleet.services.rules:math_answer"
    a, b = (int(x) for x in t1.rows[0]["prompt"][0]["content"].rstrip("=").split("+"))
    assert t1.rows[0]["answer"] == str(a + b)
    assert build_task("char_fraction", 0, 3).rows[0]["target"] == "a"
    calc = build_task("calculator", 0, 3).rows[0]
    a, b = (int(x) for x in calc["question"].removeprefix('what is "').removesuffix('"?').split("*"))
    assert calc["answer"] == str(a * b) and calc["prompt"][0]["content"] == calc["question"]
    assert 1 <= build_task("guess_number", 0, 3).rows[0]["secret"] <= 20
    with pytest.raises(ValueError, match="unknown data.task 'nope'; built-in tasks: addition, calculator, "
                                         "guess_number, char_fraction"):
        build_task("nope", 0, 1)


def test_verl_openrlhf_and_trl_layouts_are_read_as_they_are(tmp_path, tiny_tokenizer):
    chat = [{"role": "user", "content": "3+4="}]
    verl = [{"data_source": "gsm8k", "prompt": chat, "reward_model": {"style": "rule", "ground_truth": "7"},
             "extra_info": {"index": 0, "split": "train"}}]
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "verl.parquet")
    rows = read_rows(tmp_path / "verl.parquet")
    assert detect_format(rows[0][1], "prompt") == "verl"
    data = build_dataset(rows, tiny_tokenizer, "prompt", 64, data_format="auto")
    assert data.examples[0].extra["reward_model"] == {"style": "rule", "ground_truth": "7"}  # nested, as it is
    assert data.examples[0].extra["extra_info"] == {"index": 0, "split": "train"}
    broken = [(f"{tmp_path}/verl.parquet row 3", {**verl[0], "reward_model": {"style": "rule"}})]
    with pytest.raises(DataError, match=r"verl.parquet row 3: a verl row needs reward_model.ground_truth"):
        build_dataset(broken, tiny_tokenizer, "prompt", 64, data_format="auto")
    # OpenRLHF: `input`, a label key, and --apply_chat_template for a text input
    openrlhf = [("f.jsonl:1", {"input": "3+4=", "solution": "7"})]
    assert detect_format(openrlhf[0][1], "prompt") == "openrlhf"
    example = build_dataset(openrlhf, tiny_tokenizer, "prompt", 64, data_format="auto", label_key="solution",
                            apply_chat_template=True).examples[0]
    assert tiny_tokenizer.decode(example.prompt_ids) == "User: 3+4=\nAssistant: " and example.extra["label"] == "7"
    with pytest.raises(DataError, match=r"f.jsonl:1: no 'answer' field \(data.label_key\)"):
        build_dataset(openrlhf, tiny_tokenizer, "prompt", 64, data_format="auto", label_key="answer")


def test_chat_template_kwargs_reach_the_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% if enable_thinking is defined and not enable_thinking %}NT {% endif %}{{ messages[0]['content'] }}"
    rows = [("r", {"prompt": [{"role": "user", "content": "hi"}]})]
    assert tok.decode(build_dataset(rows, tok, "prompt", 64).examples[0].prompt_ids) == "hi"
    off = build_dataset(rows, tok, "prompt", 64, template_kwargs={"enable_thinking": False})
    assert tok.decode(off.examples[0].prompt_ids) == "NT hi"


def test_dataset_folders_by_split_save_to_disk_and_hub_cache(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert [r["prompt"] for _, r in read_rows(tmp_path / "dd")] == ["q0", "q1", "q2"]
    assert [r["prompt"] for _, r in read_rows(tmp_path / "dd", "validation")] == ["q0"]
    with pytest.raises(DataError, match=r"no split 'test' \(data.train_split / data.eval_split\); splits: "
                                        r"\['train', 'validation'\]"):
        read_rows(tmp_path / "dd", "test")
    snapshot = tmp_path / "datasets--org--name" / "snapshots" / "abc" / "data"
    snapshot.mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(snapshot / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(snapshot / "test-00000-of-00001.parquet"))
    assert len(read_rows(tmp_path / "datasets--org--name")) == 3
    assert len(read_rows(tmp_path / "datasets--org--name", "test")) == 2

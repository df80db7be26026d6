"""Prompt data: loading, rendering to token ids, and a resumable, seeded sampler.

Sources, read as users have them (no conversion, no `datasets` import): a JSON-lines file, a
Parquet file, a folder written by `datasets`' `save_to_disk` (Arrow files; a DatasetDict's
split folders), or a folder of Parquet shards (a hub-cache snapshot, `data/train-*.parquet`).
Layouts (`data.format`): rlfleet's and TRL's (`prompt`: text or chat messages), verl's RL
parquet (`prompt` as messages, `data_source`, `reward_model.ground_truth`, `extra_info`),
OpenRLHF's (`input_key`, `label_key`, `apply_chat_template`). Each example's fields travel with
it, as they are, to the reward functions. Every error names the file and the line or row.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlfleet.common.records import PromptInput


class DataError(ValueError):
    """Bad prompt data; the message names the file and line (or row)."""


@dataclass(frozen=True)
class Example:
    """One prompt, ready for the rollout fleet."""

    prompt_ids: list[int]
    """Rendered prompt token ids."""
    extra: dict[str, Any]
    """The example's other fields, passed to reward functions."""


@dataclass
class PromptDataset:
    """Examples that passed the length limit, and how many were dropped."""

    examples: list[Example]
    dropped_too_long: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)


def render_prompt(prompt: PromptInput, tokenizer: PreTrainedTokenizerBase,
                  template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of a prompt given as ids, text, or chat messages (rendered with the chat
    template, given `template_kwargs` such as enable_thinking; tokenized without adding special
    tokens, so a template that writes the BOS gives exactly one)."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    if prompt and isinstance(prompt[0], dict):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False,
                                                  **dict(template_kwargs or {})))
    return [int(t) for t in prompt]  # type: ignore[union-attr]


def read_rows(path: str | Path, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every example in a .jsonl / .parquet file or a dataset folder (its
    `split` where it holds several)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dir(path, split)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{lineno}", row))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]


def _read_dir(path: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """A `save_to_disk` folder (Arrow files; a DatasetDict has one folder per split) or a folder
    of Parquet shards, e.g. a hub-cache snapshot (`data/<split>-00000-of-00001.parquet`)."""
    if (path / "dataset_dict.json").is_file() or (path / split / "dataset_info.json").is_file():
        if not (path / split).is_dir():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(f"{path}: no split {split!r} (data.train_split / data.eval_split); splits: {splits}")
        path = path / split
    arrows = sorted(path.glob("*.arrow"))
    if arrows:
        return _read_arrow(arrows)
    shards = sorted(p for p in path.rglob("*.parquet"))
    if not shards:
        raise DataError(f"{path}: a dataset folder needs the .arrow files written by save_to_disk or .parquet shards")
    named = [p for p in shards if p.name.split("-")[0] == split or p.parent.name == split]
    if len({p.name.split("-")[0] for p in shards}) > 1 or named:
        shards = named
        if not shards:
            raise DataError(f"{path}: no Parquet shard of split {split!r} (data.train_split / data.eval_split)")
    return [r for shard in shards for r in _read_parquet(shard)]


def _read_arrow(files: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa

    rows: list[tuple[str, dict[str, Any]]] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        rows.extend((f"{file} row {i}", row) for i, row in enumerate(table.to_pylist()))
    return rows


FORMATS = ("rlfleet", "trl", "verl", "openrlhf")


def detect_format(row: Mapping[str, Any], prompt_key: str) -> str:
    """The layout of a data row (`data.format: auto`): verl's when it has `reward_model` or
    `data_source`; OpenRLHF's when the prompt field is missing and `input` is there; else
    rlfleet's / TRL's (the same: a `prompt` field and any others)."""
    if "reward_model" in row or "data_source" in row:
        return "verl"
    if prompt_key not in row and "input" in row:
        return "openrlhf"
    return "rlfleet"


def build_dataset(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    prompt_key: str,
    max_prompt_tokens: int,
    on_long_prompt: str = "drop",
    source: str = "",
    data_format: str = "rlfleet",
    label_key: str | None = None,
    apply_chat_template: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> PromptDataset:
    """Render every row's prompt; longer than `max_prompt_tokens`: drop (counted) or raise.
    `data_format` "auto" is detected from the first row. A row keeps all its fields (the prompt
    too) for the reward functions; `label_key`'s field is also its `label` (OpenRLHF's)."""
    if data_format == "auto" and rows:
        data_format = detect_format(rows[0][1], prompt_key)
    if data_format == "openrlhf" and prompt_key == "prompt" and rows and "prompt" not in rows[0][1]:
        prompt_key = "input"  # OpenRLHF's default input_key
    examples: list[Example] = []
    dropped = 0
    for where, row in rows:
        if prompt_key not in row:
            raise DataError(f"{where}: no '{prompt_key}' field (data.prompt_key); fields: {sorted(row)}")
        prompt = row[prompt_key]
        if apply_chat_template and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not _is_prompt(prompt):
            raise DataError(f"{where}: '{prompt_key}' must be text or a list of chat messages "
                            f"({{'role', 'content'}}), got {type(prompt).__name__}")
        extra = dict(row)
        if data_format == "verl":
            _check_verl(where, row)
        if label_key is not None:
            if label_key not in row:
                raise DataError(f"{where}: no '{label_key}' field (data.label_key); fields: {sorted(row)}")
            extra["label"] = row[label_key]
        try:
            ids = render_prompt(prompt, tokenizer, template_kwargs)
        except Exception as err:  # noqa: BLE001 - a template error is this row's
            raise DataError(f"{where}: the chat template failed on '{prompt_key}' ({type(err).__name__}: {err})") \
                from None
        if not ids:
            raise DataError(f"{where}: the prompt is empty")
        if len(ids) > max_prompt_tokens:
            if on_long_prompt == "error":
                raise DataError(f"{where}: the prompt has {len(ids)} tokens; data.max_prompt_tokens is "
                                f"{max_prompt_tokens} (or set data.on_long_prompt=drop)")
            dropped += 1
            continue
        examples.append(Example(ids, extra))
    if not examples:
        raise DataError(f"{source or 'data'}: no usable prompts ({dropped} longer than "
                        f"data.max_prompt_tokens={max_prompt_tokens})")
    return PromptDataset(examples, dropped, source)


def _check_verl(where: str, row: Mapping[str, Any]) -> None:
    """verl's RL parquet: `reward_model.ground_truth` is what its reward functions score against."""
    model = row.get("reward_model")
    if not isinstance(model, Mapping) or "ground_truth" not in model:
        raise DataError(f"{where}: a verl row needs reward_model.ground_truth (data.format: verl, or auto and the "
                        f"row has data_source); reward_model is {model!r}. Data without it: set data.format: rlfleet")


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and bool(prompt) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    )


@dataclass
class PromptSampler:
    """Deterministic batches of example indices: each epoch is a permutation seeded by
    (seed, epoch); the position (epoch, index) is the whole state, so a resumed run draws the
    same batches as one that never stopped."""

    size: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    index: int = 0
    _order: list[int] = field(default_factory=list, repr=False)
    _order_epoch: int = field(default=-1, repr=False)

    def next_batch(self, k: int) -> list[int]:
        """The next k indices, crossing into the next epoch when this one runs out."""
        out: list[int] = []
        while len(out) < k:
            if self.index >= self.size:
                self.epoch += 1
                self.index = 0
            order = self._epoch_order()
            take = min(k - len(out), self.size - self.index)
            out.extend(order[self.index : self.index + take])
            self.index += take
        return out

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            order = list(range(self.size))
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
            self._order = order
            self._order_epoch = self.epoch
        return self._order

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "size": self.size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["size"] != self.size:
            raise DataError(f"the checkpoint's data position is for {state['size']} prompts; "
                            f"the data now has {self.size} (did the dataset change?)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

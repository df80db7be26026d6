"""Prompt data: loading, rendering to token ids, and a resumable, seeded sampler.

Sources: a JSON-lines file, a Parquet file, or a folder written by `datasets`'
`save_to_disk` (Arrow files; read with pyarrow, no `datasets` import). Each example has a
prompt field (text, or chat messages rendered with the tokenizer's chat template); its other
fields travel with it to the reward functions (e.g. a reference `answer`). Every error names
the file and the line or row.
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


def render_prompt(prompt: PromptInput, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a prompt given as ids, text, or chat messages (rendered with the chat template)."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    if prompt and isinstance(prompt[0], dict):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False))
    return [int(t) for t in prompt]  # type: ignore[union-attr]


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every example in a .jsonl / .parquet file or a `save_to_disk` folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_arrow_dir(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
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


def _read_arrow_dir(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa

    files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{path}: a dataset folder needs the .arrow files written by save_to_disk")
    rows: list[tuple[str, dict[str, Any]]] = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        rows.extend((f"{file} row {i}", row) for i, row in enumerate(table.to_pylist()))
    return rows


def build_dataset(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    tokenizer: PreTrainedTokenizerBase,
    prompt_key: str,
    max_prompt_tokens: int,
    on_long_prompt: str = "drop",
    source: str = "",
) -> PromptDataset:
    """Render every row's prompt; longer than `max_prompt_tokens`: drop (counted) or raise."""
    examples: list[Example] = []
    dropped = 0
    for where, row in rows:
        if prompt_key not in row:
            raise DataError(f"{where}: no '{prompt_key}' field (data.prompt_key); fields: {sorted(row)}")
        prompt = row[prompt_key]
        if not _is_prompt(prompt):
            raise DataError(f"{where}: '{prompt_key}' must be text or a list of chat messages "
                            f"({{'role', 'content'}}), got {type(prompt).__name__}")
        ids = render_prompt(prompt, tokenizer)
        if not ids:
            raise DataError(f"{where}: the prompt is empty")
        if len(ids) > max_prompt_tokens:
            if on_long_prompt == "error":
                raise DataError(f"{where}: the prompt has {len(ids)} tokens; data.max_prompt_tokens is "
                                f"{max_prompt_tokens} (or set data.on_long_prompt=drop)")
            dropped += 1
            continue
        examples.append(Example(ids, {k: v for k, v in row.items() if k != prompt_key}))
    if not examples:
        raise DataError(f"{source or 'data'}: no usable prompts ({dropped} longer than "
                        f"data.max_prompt_tokens={max_prompt_tokens})")
    return PromptDataset(examples, dropped, source)


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

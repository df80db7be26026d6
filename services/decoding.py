"""Token ids → text for the reward service's rules, remote scorer and gold checker.

A tokenizer folder with a `tokenizer.json` (every fast tokenizer) is decoded by the
`tokenizers` library directly, exactly as transformers' fast tokenizer decodes it when no
clean-up of tokenization spaces is asked for. That spares a rule-only reward service the
import of transformers and torch (seconds of CPU at every start and restart). Any other folder
(a slow tokenizer, or one whose config asks for the clean-up) goes through `AutoTokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class TextDecoder:
    """`batch_decode(ids, skip_special_tokens=True)` of the tokenizer at `path`."""

    def __init__(self, path: str):
        folder = Path(path)
        self._fast: Any = None
        self._auto: Any = None
        if _fast_decode_is_exact(folder):
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            self._auto = AutoTokenizer.from_pretrained(path)

    @property
    def direct(self) -> bool:
        """Whether `tokenizers` decodes directly (no transformers)."""
        return self._fast is not None

    def batch_decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        if self._fast is not None:
            return self._fast.decode_batch([list(i) for i in ids], skip_special_tokens=True)
        return self._auto.batch_decode(ids, skip_special_tokens=True)


def _fast_decode_is_exact(folder: Path) -> bool:
    if not (folder / "tokenizer.json").is_file():
        return False
    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError):
        return False  # AutoTokenizer reports what is wrong with it
    return not config.get("clean_up_tokenization_spaces", False)

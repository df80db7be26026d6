"""Chat-template text for multi-turn trajectories, rendered once per piece.

A trajectory is the prompt's ids, then each turn's generated ids followed by the ids of the
observation that answers it. The observation's text is what the chat template writes between
the end of the model's turn (its EOS) and the start of the model's next turn: the rest of the
assistant turn's closing (e.g. a newline), the observation messages, and the next assistant
header. It is tokenized once, when it is appended; the conversation is never re-rendered and
re-tokenized, so the ids the learner trains on are the ids the engine generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

_PROBE_USER, _PROBE_ANSWER = "q", "a"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render observations as an appendable suffix."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], generation: bool,
            tools: Sequence[dict[str, Any]] | None = None) -> str:
    return tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None, tokenize=False,
                                         add_generation_prompt=generation)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
               tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """An episode's opening ids: its messages (and the tools) rendered with the template, up to
    and including the first assistant header."""
    return list(tokenizer.encode(_render(tokenizer, messages, True, tools), add_special_tokens=False))


def turn_closing(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template writes after an assistant turn's EOS (e.g. '\\n')."""
    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    text = _render(tokenizer, probe, False)
    end = _PROBE_ANSWER + (tokenizer.eos_token or "")
    at = text.rfind(end)
    if at < 0:
        raise ChatTemplateError("the chat template does not end an assistant turn with the EOS token "
                                f"{tokenizer.eos_token!r}: the model's generated turn cannot be continued exactly")
    return text[at + len(end):]


def observation_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], closing: str) -> str:
    """The text appended after a model turn's EOS: `closing` (see `turn_closing`), the
    observation `messages`, and the next assistant header."""
    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    before = _render(tokenizer, probe, False)
    after = _render(tokenizer, [*probe, *messages], True)
    if not after.startswith(before):
        raise ChatTemplateError("the chat template renders earlier turns differently once later ones follow; "
                                "observations cannot be appended to a trajectory token-exactly")
    return closing + after[len(before):]


def observation_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], closing: str) -> list[int]:
    """`observation_text` tokenized (once, by itself)."""
    return list(tokenizer.encode(observation_text(tokenizer, messages, closing), add_special_tokens=False))

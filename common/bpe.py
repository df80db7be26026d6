"""A byte-level BPE tokenizer that rlfleet trains itself (no download), for multi-turn tests.

The character tokenizer gives one token per character, so a bug that splits or merges tokens
at a turn boundary cannot show with it. This one has multi-character tokens (merges learned
from a built-in corpus: the tasks' prompts, arithmetic, tool calls and tool schemas, feedback lines), special
tokens for the roles and for tool calls, each always one id, and a chat template that renders
`tools` (the JSON schemas transformers derives from Python functions) in a system turn:

    <|system|>Tools: [{...}]<|end|>
    <|user|>what is 12*34?<|end|>
    <|assistant|><tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call></s>
    <|tool|>408<|end|>
    <|assistant|>408</s>

Byte-level pre-tokenization makes every text round-trip exactly (decode(encode(t)) == t).
The same call gives the same vocabulary and merges (training reads the corpus in order).
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>")
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS, TOOL_CALL_START, TOOL_CALL_END)

BPE_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>Tools: {{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}" + EOS + "\n"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = ("what", "is", "the", "answer", "higher", "lower", "correct", "guess", "number", "between",
          "and", "calculator", "expression", "result", "error", "reverse", "write", "letter", "a", "an",
          "say", "only", "with", "many", "times", "tool", "call", "name", "arguments", "found", "it")


def bpe_corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Lines in the style of the built-in tasks and environments (deterministic)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        kind = rng.randrange(6)
        if kind == 0:
            out.append(f"what is {a}{op}{b}? the answer is {eval(f'{a}{op}{b}')}")  # noqa: S307 - our own digits
        elif kind == 1:
            out.append(f'{TOOL_CALL_START}{{"name": "calculator", "arguments": {{"expression": "{a}{op}{b}"}}}}'
                       f"{TOOL_CALL_END}")
        elif kind == 2:
            out.append(f"guess a number between 1 and {b + 2}: {a} is {rng.choice(['higher', 'lower', 'correct'])}")
        elif kind == 5:  # a tool's JSON schema, as the chat template renders `tools`
            out.append(_schema_line(rng))
        elif kind == 3:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))))
        else:
            out.append("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))))
    return out


def _schema_line(rng: random.Random) -> str:
    name, arg = rng.choice(_WORDS), rng.choice(_WORDS)
    kind = rng.choice(["string", "integer", "number"])
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))
    if rng.random() < 0.5:  # the built-in calculator tool's own schema
        name, arg, kind = "calculator", "expression", "string"
        words = 'integers with + - * // % and parentheses, e.g. \\"12*(3+4)\\".'
    return (f'Tools: [{{"type": "function", "function": {{"name": "{name}", "description": "Evaluate an integer '
            f'arithmetic expression.", "parameters": {{"type": "object", "properties": {{"{arg}": {{"type": "{kind}", '
            f'"description": "{words}"}}}}, "required": ["{arg}"]}}, "return": {{"type": "{kind}"}}}}}}]')


def build_bpe_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the BPE tokenizer on `bpe_corpus(seed)`; special tokens get ids 0 … 10."""
    core = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    core.train_from_iterator(bpe_corpus(seed), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  unk_token=UNK, additional_special_tokens=[*ROLE_TOKENS, TOOL_CALL_START,
                                                                           TOOL_CALL_END])
    tok.chat_template = BPE_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok

"""Tiny models that rlfleet builds itself, deterministically from a seed, with no download.

A character-level tokenizer (a `tokenizers` WordLevel model over single characters, wrapped
in `PreTrainedTokenizerFast`) or a byte-level BPE one (`rlfleet.common.bpe`), a small Llama or Qwen2 causal LM and a reward model with the
same backbone and a one-label sequence-classification head. Everything is saved with
`save_pretrained`, so transformers, peft and vLLM load the same folder.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlfleet.common.config import TinyModelConfig

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII plus newline; every character is one token.
ALPHABET = tuple(sorted(set(string.printable) - set("\t\r\x0b\x0c")))

# "User: ...\nAssistant: " — plain characters, so the character tokenizer needs no role tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}" + EOS + "\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

_ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def build_tokenizer(kind: str = "char") -> PreTrainedTokenizerFast:
    """`TinyModelConfig.tokenizer`: the character tokenizer or the BPE one (rlfleet.common.bpe)."""
    if kind == "bpe":
        from rlfleet.common.bpe import build_bpe_tokenizer

        return build_bpe_tokenizer()
    return build_char_tokenizer()


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0-3 are pad, bos, eos, unk; then one id per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def _backbone_config(tok: PreTrainedTokenizerFast, shape: TinyModelConfig) -> PretrainedConfig:
    config_cls, _ = _ARCHS[shape.arch]
    return config_cls(
        vocab_size=len(tok),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )


def tiny_model_config(shape: TinyModelConfig | None = None) -> PretrainedConfig:
    """The transformers config of the tiny model `build_tiny_causal_lm` would build (no weights)."""
    shape = shape or TinyModelConfig()
    return _backbone_config(build_tokenizer(shape.tokenizer), shape)


def build_tiny_causal_lm(
    out_dir: str | Path, seed: int = 0, shape: TinyModelConfig | None = None
) -> Path:
    """Build and save the tokenizer and a randomly initialised tiny causal LM into `out_dir`.

    The same seed and shape give bit-identical weights.
    """
    shape = shape or TinyModelConfig()
    tok = build_tokenizer(shape.tokenizer)
    config = _backbone_config(tok, shape)
    _, model_cls = _ARCHS[shape.arch]
    torch.manual_seed(seed)
    model = model_cls(config)
    # Random init leaves generation_config defaults that vLLM would treat as sampling overrides.
    model.generation_config.do_sample = True
    return _save(model, tok, out_dir)


def build_tiny_reward_model(
    out_dir: str | Path, seed: int = 0, shape: TinyModelConfig | None = None
) -> Path:
    """Build and save a tiny reward model: same backbone, a 1-label sequence-classification head."""
    shape = shape or TinyModelConfig()
    tok = build_tokenizer(shape.tokenizer)
    config = _backbone_config(tok, shape)
    config.num_labels = 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    return _save(model, tok, out_dir)


def _save(model: torch.nn.Module, tok: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out

"""Tiny models: built offline and deterministically; they load in transformers (and peft)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlfleet.common.config import TinyModelConfig
from rlfleet.common.tiny_models import (
    ALPHABET,
    build_char_tokenizer,
    build_tiny_causal_lm,
    build_tiny_reward_model,
)

pytestmark = pytest.mark.unit

TOKENIZER = build_char_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(ALPHABET), max_size=60))
def test_one_token_per_character_and_exact_round_trip(text: str) -> None:
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert TOKENIZER.decode(ids) == text


def test_special_tokens_and_chat_template() -> None:
    tok = TOKENIZER
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode([tok.eos_token_id]) == tok.eos_token
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "2+2="}], add_generation_prompt=True, return_dict=False
    )
    assert tok.decode(ids) == "User: 2+2=\nAssistant: "


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    a = load_file(build_tiny_causal_lm(tmp_path / "a", seed=7) / "model.safetensors")
    b = load_file(build_tiny_causal_lm(tmp_path / "b", seed=7) / "model.safetensors")
    c = load_file(build_tiny_causal_lm(tmp_path / "c", seed=8) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_causal_lm_loads_in_transformers(tmp_path: Path, arch: str) -> None:
    path = build_tiny_causal_lm(tmp_path, seed=0, shape=TinyModelConfig(arch=arch))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == arch and cfg.num_hidden_layers == 2
    assert cfg.hidden_size // cfg.num_attention_heads >= 32
    ids = torch.tensor([tok.encode("12+34=")])
    logits = model(ids).logits
    assert logits.shape == (1, 6, len(tok))
    # The loaded model is the saved one: logits equal those of a second load exactly.
    again = AutoModelForCausalLM.from_pretrained(path)(ids).logits
    assert torch.equal(logits, again)


def test_reward_model_scores_last_non_padding_token(tmp_path: Path) -> None:
    path = build_tiny_reward_model(tmp_path, seed=0)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1
    tok.padding_side = "right"
    batch = tok(["1+1=2", "1+1=22222"], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits
        alone = model(torch.tensor([tok.encode("1+1=2")])).logits
    assert scores.shape == (2, 1)
    # Right padding does not change the score: it is read at the last non-padding token.
    torch.testing.assert_close(scores[0], alone[0], rtol=0, atol=1e-5)

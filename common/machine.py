"""What a measurement ran on: the CPU model, its vector and matrix instructions, the cores and
the software versions.

fp32 training is deterministic on one machine, but the matrix kernels torch picks depend on
the instruction set (AVX2, AVX-512, AMX), and each sums in its own order. Over hundreds of
optimizer steps a half-trained model's numbers then land elsewhere, so a reported number
names the machine that measured it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX or AVX-512 BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpuinfo()[1])


def describe_machine() -> dict[str, str | int]:
    """The CPU model, which of AVX2 / AVX-512 / AMX it has, the usable cores, torch's build and
    the intra-op threads of this process."""
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "cpu_features": " ".join(f for f in _FEATURES if f in flags) or "none of " + "/".join(_FEATURES),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def machine_line(m: dict[str, str | int]) -> str:
    return f"{m['cpu']} ({m['cpu_features']}), {m['cores']} cores, torch {m['torch']}"

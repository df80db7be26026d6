"""Saving the learner's training state without pickles: tensors in safetensors, the rest in JSON.

An optimizer's state dict is split into its tensors (`state.<param index>.<key>`, one
safetensors file) and its param groups (JSON); a scheduler's state dict is JSON; RNG states
are a uint8 tensor (torch) and a JSON list (Python's `random`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{key}": value.detach().contiguous().cpu()
        for index, per_param in state["state"].items()
        for key, value in per_param.items()
    }
    save_file(tensors, str(folder / f"{name}.safetensors"))
    write_json(folder / f"{name}.json", {"param_groups": state["param_groups"]})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, field = key.split(".", 2)
        state.setdefault(int(index), {})[field] = value
    groups = read_json(folder / f"{name}.json")["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_rng(folder: Path) -> None:
    save_file({"torch": torch.get_rng_state()}, str(folder / "rng.safetensors"))
    version, internal, gauss = random.getstate()
    write_json(folder / "rng.json", {"python": [version, list(internal), gauss]})


def load_rng(folder: Path) -> None:
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    version, internal, gauss = read_json(folder / "rng.json")["python"]
    random.setstate((version, tuple(internal), gauss))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())

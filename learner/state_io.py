"""Saving the learner's training state without pickles: tensors in safetensors, the rest in JSON.

An optimizer's state dict, keyed by parameter name (torch.distributed.checkpoint's full state
dict, so it is the same for any number of ranks, sharded or not), is split into its tensors
(`state.<parameter name>.<key>`, one safetensors file) and its param groups (JSON); a
scheduler's state dict is JSON; RNG states are a uint8 tensor (torch) and a JSON list
(Python's `random`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (on the CPU). Sharded by FSDP, the
    shards are gathered (a collective: every rank calls it) and only rank 0 gets the result."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(state: dict, folder: Path, name: str) -> None:
    """Write an `optimizer_state`: tensors as `state.<parameter name>.<field>`, groups as JSON."""
    tensors = {
        f"state.{param}.{key}": value.detach().contiguous().cpu()
        for param, per_param in state["state"].items()
        for key, value in per_param.items()
    }
    save_file(tensors, str(folder / f"{name}.safetensors"))
    write_json(folder / f"{name}.json", {"param_groups": state["param_groups"]})


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path, name: str) -> None:
    """Restore what `save_optimizer` wrote, whatever the number of ranks that wrote or read it
    (names, not positions, tie state to parameters; each rank keeps its own shards)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / f"{name}.safetensors")).items():
        param, field = key.removeprefix("state.").rsplit(".", 1)
        state.setdefault(param, {})[field] = value
    groups = read_json(folder / f"{name}.json")["param_groups"]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load full (unsharded) weights by name; a sharded model keeps only its shards."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


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

"""Where the learner's state lives. `learner.offload`: colocated on the engines' GPUs, the
learner's parameters, gradients and optimizer state go to host memory while the engines
generate, and come back before the learner's next computation.

`Learner.offload()` is called by the loop once the step's push is done; every method that
computes with or reads the models first calls `_onload()` (`onloaded`), so that the order of
calls can never compute on weights that are away. Each tensor is copied to a new buffer
(pinned on a CUDA host) and swapped in under the same `Parameter` object, so optimizers, tied
weights and LoRA wrappers keep their references: the updates are identical with and without
offloading (`tests/learner/test_offload.py`; on a GPU: `scripts/gpu_check.sh`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from rlfleet.learner.models import full_tensor


def onloaded(method: Callable) -> Callable:
    """Bring the learner's state back to its device before `method` runs."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        self._onload()
        return method(self, *args, **kwargs)

    return wrapper


class LearnerMemory:
    """`Learner`'s methods about its state's place and size (its state: `policy`, `critic`,
    `_reference`, `optimizer`, `critic_optimizer`, `device`, `_cfg`)."""

    policy: torch.nn.Module
    critic: torch.nn.Module | None
    _reference: Any
    optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer | None
    device: torch.device
    _cfg: Any
    _offloaded: bool = False

    def offload(self) -> int:
        """Move the models' parameters, gradients and buffers and the optimizers' state to host
        memory (`learner.offload`; nothing when it is off or already done); the bytes moved."""
        if not self._cfg.learner.offload or self._offloaded:
            return 0
        moved = _move(self._models(), self._optimizers(), torch.device("cpu"))
        self._offloaded = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return moved

    def _onload(self) -> None:
        if self._offloaded:
            _move(self._models(), self._optimizers(), self.device)
            self._offloaded = False

    @onloaded
    def parameter_snapshot(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter (policy and critic) by name, on the CPU: for tests and audits."""
        out = {f"policy.{n}": full_tensor(p).cpu().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        if self.critic is not None:
            out.update({f"critic.{n}": full_tensor(p).cpu().clone() for n, p in self.critic.named_parameters()})
        return out

    def local_numel(self) -> int:
        """Parameters this rank holds (its shards under FSDP): policy, critic and reference."""
        return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for m in self._models() for p in m.parameters())

    def _models(self) -> list[torch.nn.Module]:
        return [m for m in (self.policy, self.critic, self._reference) if isinstance(m, torch.nn.Module)]

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.optimizer, self.critic_optimizer) if o is not None]


def _move(models: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], device: torch.device) -> int:
    moved = 0
    for model in models:
        for p in model.parameters():  # each shared (tied) parameter once
            p.data, n = _copy(p.data, device)
            moved += n
            if p.grad is not None:
                p.grad, n = _copy(p.grad, device)
                moved += n
        for owner, name, buf in _buffers(model):
            owner._buffers[name], n = _copy(buf, device)
            moved += n
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, value in state.items():
                # 0-dim entries (AdamW's `step`) stay where the optimizer keeps them
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key], n = _copy(value, device)
                    moved += n
    return moved


def _buffers(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.Tensor]]:
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                yield module, name, buf


def _copy(tensor: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """A copy of `tensor` in a new buffer on `device` (pinned host memory when a GPU is the
    other side), and its bytes."""
    pin = device.type == "cpu" and torch.cuda.is_available()
    out = torch.empty_like(tensor, device=device, pin_memory=pin)
    out.copy_(tensor)
    return out, tensor.numel() * tensor.element_size()

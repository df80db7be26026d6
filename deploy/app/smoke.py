"""The smallest real end-to-end run: tiny model → local Ray → vLLM engine in an actor → samples.

Stands in for `rlfleet demo` until the training pipeline lands: it builds the tiny model,
starts a local Ray cluster, generates with vLLM inside a Ray actor and checks the engine's
log-probs against a transformers forward pass.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfleet.common.config import RunConfig
from rlfleet.common.records import Rollout, SamplingSpec
from rlfleet.common.tiny_models import build_tiny_causal_lm
from rlfleet.deploy.actors.assembly import start_vllm_worker

logger = logging.getLogger(__name__)

DEMO_PROMPTS = ("12+7=", "sort: dbca", "Hello")


def response_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [T] of the response tokens under `model` (one forward pass, fp32 log-softmax)."""
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(rollout.prompt_ids) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(rollout.response_ids)[:, None])[:, 0]


def run_smoke(out_dir: Path, cfg: RunConfig) -> float:
    """Generate from the tiny model in a vLLM actor; return max |logπ_vllm − logπ_hf|."""
    model_dir = build_tiny_causal_lm(out_dir / "tiny-policy", seed=cfg.seed, shape=cfg.model.tiny)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        for p in DEMO_PROMPTS
    ]
    worker = start_vllm_worker(str(model_dir), cfg.rollout, cfg.cluster.rollout, seed=cfg.seed)
    spec = SamplingSpec(n=2, max_tokens=24, temperature=1.0)
    batch = ray.get(worker.generate.remote(prompts, spec))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    worst = 0.0
    for r in batch.rollouts:
        diff = (response_logprobs(model, r) - torch.tensor(r.logprobs)).abs().max().item()
        worst = max(worst, diff)
        logger.info("prompt %r → %r (%s, v%d)", DEMO_PROMPTS[r.prompt_index],
                    tok.decode(r.response_ids), r.finish_reason, r.policy_version)
    logger.info("%d responses, %d tokens in %.2fs; max |logp_vllm - logp_hf| = %.2e",
                len(batch.rollouts), batch.num_tokens, batch.generate_seconds, worst)
    ray.kill(worker)
    return worst


def main(cfg: RunConfig, out_dir: str | None = None) -> int:
    logging.basicConfig(level=cfg.logging.level, format="%(message)s", stream=sys.stdout)
    ray.init(num_cpus=cfg.cluster.num_cpus or 2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            worst = run_smoke(Path(out_dir or tmp), cfg)
    finally:
        ray.shutdown()
    ok = worst < 1e-4
    logger.info("smoke run %s", "OK" if ok else "FAILED: vLLM and transformers disagree")
    return 0 if ok else 1

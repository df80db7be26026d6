"""The reference service: per-token log-probs of response tokens under the frozen initial policy.

Prompts are left-padded and responses right-padded within a micro-batch, so every row's
response occupies the same columns; logits are computed for those columns only
(`logits_to_keep`), and log-probs in fp32 without a full log-softmax copy. Position ids
count real tokens, so padding does not change the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM

from rlfleet.common.collate import pack
from rlfleet.common.precision import autocast
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.learner.algos import logprobs_from_logits
from rlfleet.services.batching import micro_batches
from rlfleet.services.info import ServiceInfo, model_info


class ReferenceService:
    """The frozen reference policy."""

    def __init__(self, model_path: str, micro_batch_size: int = 16, dtype: torch.dtype = torch.float32,
                 threads: ThreadBudget | None = None, compute_dtype: str = "float32"):
        """`compute_dtype`: the run's `model.dtype`; 'bfloat16' computes under the learner's
        autocast (fp32 weights, log-probs from fp32 logits), so that the reference and the
        policy agree exactly before the first update."""
        apply_thread_budget(threads)
        self._compute_dtype = compute_dtype
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._model = model
        self._pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self._micro_batch_size = micro_batch_size
        self.forward_widths: list[int] = []
        """Logit columns computed per forward pass (response tokens + 1), for tests and metrics."""

    def info(self) -> ServiceInfo:
        return model_info(self._model)

    def health(self) -> bool:
        return True

    @torch.no_grad()
    def logprobs(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        temperature: float = 1.0,
    ) -> list[list[float]]:
        """log π_ref(response token | prefix) for every response token, per response.

        `temperature` divides the logits, as on the rollout and learner side."""
        out: list[list[float]] = [[] for _ in prompt_ids]
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        for idx in micro_batches(lengths, self._micro_batch_size):
            rows = self._forward([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], temperature)
            for i, row in zip(idx, rows, strict=True):
                out[i] = row
        return out

    def counted_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                         temperature: float = 1.0) -> tuple[int, list[list[float]]]:
        """`logprobs` and their count, as two return values (`num_returns=2`): the caller learns
        that the call succeeded from the count and leaves the rows in the object store."""
        out = self.logprobs(prompt_ids, response_ids, temperature)
        return len(out), out

    def _forward(self, prompts: list[Sequence[int]], responses: list[Sequence[int]], temperature: float) -> list[list[float]]:
        device = next(self._model.parameters()).device
        batch = pack(prompts, responses, self._pad_id).to(device)
        width_r = batch.response_mask.shape[1]
        with autocast(device, self._compute_dtype):
            logits = self._model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=width_r + 1,
            ).logits[:, :-1]
        self.forward_widths.append(logits.shape[1])
        logprobs = logprobs_from_logits(logits.float() / temperature, batch.response_ids)
        return [logprobs[row, : len(r)].tolist() for row, r in enumerate(responses)]

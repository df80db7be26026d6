"""A sequence-classification reward model: one score per (prompt + response), micro-batched.

The score is read at the last real token of each sequence (found from the attention mask,
not from the pad id: a sampled response may contain the pad token). Position ids count real
tokens only, so left or right padding gives the score of the unpadded sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import AutoModelForSequenceClassification

from rlfleet.common.precision import autocast
from rlfleet.services.batching import last_token_positions, micro_batches, pad_batch
from rlfleet.services.info import ServiceInfo, model_info


class RewardModelScorer:
    """Scores token sequences with a 1-label sequence-classification model."""

    def __init__(
        self,
        path: str,
        micro_batch_size: int = 16,
        padding_side: str = "right",
        dtype: torch.dtype = torch.float32,
        field: str = "reward.model_path",
        compute_dtype: str = "float32",
    ):
        """`compute_dtype` 'bfloat16': matrix products under bf16 autocast, scores in fp32."""
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ValueError(f"{field}={path!r}: cannot load a sequence-classification model ({err})") from None
        if model.config.num_labels != 1:
            raise ValueError(
                f"{field}={path!r}: the model's head has {model.config.num_labels} labels; "
                "a reward model needs exactly 1"
            )
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        if head is None:
            raise ValueError(f"{field}={path!r}: no 'score' or 'classifier' head found on {type(model).__name__}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._model = model.to(device).eval()
        self._head = head
        self._pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self._micro_batch_size = micro_batch_size
        self._padding_side = padding_side
        self._compute_dtype = compute_dtype
        self.batch_sizes: list[int] = []
        """Sizes of the forward passes run so far (micro-batching is observable)."""

    def info(self) -> ServiceInfo:
        return model_info(self._model)

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """One float per sequence (prompt ids + response ids), in input order."""
        scores = [math.nan] * len(sequences)
        device = next(self._model.parameters()).device
        for idx in micro_batches([len(s) for s in sequences], self._micro_batch_size):
            ids, mask, pos = pad_batch([sequences[i] for i in idx], self._pad_id, self._padding_side)
            with autocast(device, self._compute_dtype):
                hidden = self._model.base_model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)
                ).last_hidden_state
                last = last_token_positions(mask).to(device)
                values = self._head(hidden[torch.arange(len(idx), device=device), last])[:, 0].float()
            for i, v in zip(idx, values.tolist(), strict=True):
                scores[i] = v
            self.batch_sizes.append(len(idx))
        return scores

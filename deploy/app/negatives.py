"""Rejected answers the policy itself gives: the `sampled` kind of negative.

A reward model has to rank what the policy will write, and hand-made near misses only guess at
that. As in the comparisons of Ouyang et al. (2022), the `sampled` negatives are the starting
model's own samples (temperature 1), checked against the reference answer: each row's rejected
answer is one of its wrong samples. Rows whose samples were all right fall back to a
`one_wrong` near miss (and say so in their kind), so every row still gives a pair.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer

from rlfleet.common.config import RunConfig
from rlfleet.common.records import SamplingSpec
from rlfleet.common.tasks import wrong_answer
from rlfleet.rollout.hf_worker import HFRolloutWorker

logger = logging.getLogger(__name__)

TRIES_PER_NEGATIVE = 4
"""Samples drawn per `sampled` negative a row asks for."""


def policy_mistakes(cfg: RunConfig, model_dir: str | Path, rows: Sequence[dict], wanted: int) -> list[list[str]]:
    """For each row ({prompt, answer}), up to `wanted` distinct wrong answers that the causal LM
    in `model_dir` sampled (finished with EOS; truncated ones are not answers), in sample order."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    worker = HFRolloutWorker(str(model_dir), cfg.rollout.model_copy(update={"dtype": "float32"}), cfg.seed)
    spec = SamplingSpec(n=TRIES_PER_NEGATIVE * wanted, max_tokens=cfg.rollout.max_response_tokens,
                        temperature=1.0, seed=cfg.seed * 1_000_003 + 17)
    mistakes: list[list[str]] = [[] for _ in rows]
    for rollout in worker.generate([r["prompt"] for r in rows], spec).rollouts:
        text = tokenizer.decode(rollout.response_ids, skip_special_tokens=True)
        found = mistakes[rollout.prompt_index]
        answer = str(rows[rollout.prompt_index]["answer"])
        if rollout.finish_reason == "stop" and text != answer and text not in found and len(found) < wanted:
            found.append(text)
    return mistakes


def sampled_negatives(cfg: RunConfig, model_dir: str | Path, rows: Sequence[dict], wanted: int,
                      rng: random.Random, split: str) -> list[list[tuple[str, str]]]:
    """Per row, `wanted` (rejected answer, kind) pairs: the model's own mistakes ('sampled'),
    topped up with 'one_wrong' near misses where it made fewer."""
    mistakes = policy_mistakes(cfg, model_dir, rows, wanted)
    out = []
    for row, found in zip(rows, mistakes, strict=True):
        answer = str(row["answer"])
        out.append([(m, "sampled") for m in found]
                   + [(wrong_answer(answer, rng, "one_wrong"), "one_wrong") for _ in range(wanted - len(found))])
    own = sum(len(m) for m in mistakes)
    logger.info("%s: %d of %d sampled negatives are the model's own mistakes (%s), the rest one wrong letter",
                split, own, wanted * len(rows), model_dir)
    return out

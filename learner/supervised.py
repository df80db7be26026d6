"""The stages before (or instead of) RL: SFT, reward-model training and DPO.

- SFT: cross-entropy on response tokens only (prompt tokens are context, not targets).
- Reward model: Bradley–Terry, −log σ(r_chosen − r_rejected), the score read at the last
  token of each (prompt, response) (Ouyang et al. 2022).
- DPO: Rafailov et al. (2023), sequence log-probs summed over response tokens, against a
  frozen copy of the starting policy.

Each stage trains in the calling process (they are small next to RL's rollouts), reports
held-out numbers before and after, and saves an HF folder the next stage loads.

Notation: B sequences, T response length.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlfleet.common.collate import pack, pad_rows
from rlfleet.learner.algos import (
    dpo_loss,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    reward_model_loss,
)
from rlfleet.learner.models import lora_targets, response_logprobs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demonstration:
    """A prompt and the response to imitate (token ids; the response ends with EOS)."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int] | None = None
    """A multi-turn trace: 1 on the model's tokens, 0 on observation tokens (not imitated)."""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred response (token ids)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    kind: str = ""
    """What kind of wrong answer the rejected one is ('swap', 'random', …): accuracy is also
    reported per kind."""


@dataclass(frozen=True)
class StageSettings:
    """How long and how fast a stage trains."""

    steps: int
    lr: float
    batch_size: int
    seed: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    """Held-out evaluation every N steps (0: only before and after)."""
    schedule: str = "constant"
    """'constant', 'linear' or 'cosine' decay to zero after warm-up."""
    warmup_steps: int = 0


def lr_factor(step: int, settings: StageSettings) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak: a linear
    warm-up over `warmup_steps`, then constant, or a linear or cosine decay that reaches zero
    after the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    if settings.schedule == "constant":
        return 1.0
    done = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    if settings.schedule == "linear":
        return 1.0 - done
    if settings.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown learning-rate schedule {settings.schedule!r}; use constant, linear or cosine")


def minibatches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """`steps` batches of indices: seeded permutations of range(n), epoch after epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order.extend(fresh)
        yield order[:batch_size]
        del order[:batch_size]


def _pad_id(model: torch.nn.Module) -> int:
    return model.config.pad_token_id or 0


def _sequence_logprobs(model, prompts: Sequence[list[int]], responses: Sequence[list[int]]) -> torch.Tensor:
    """Σ_t log π(response token t) [B]."""
    batch = pack(prompts, responses, _pad_id(model)).to(next(model.parameters()).device)
    logprobs, _ = response_logprobs(model, batch, 1.0)
    return masked_sum(logprobs, batch.response_mask, dim=-1)


def accuracy_by_kind(pairs: Sequence[PreferencePair], correct: torch.Tensor) -> dict[str, float]:
    """`accuracy/<kind>`: the share of pairs of each kind ranked right (`correct` [B] bool)."""
    kinds = sorted({p.kind for p in pairs if p.kind})
    out = {}
    for kind in kinds:
        picked = torch.tensor([p.kind == kind for p in pairs])
        out[f"accuracy/{kind}"] = correct[picked].float().mean().item()
    return out


def _train(model, settings: StageSettings, n: int, loss_fn: Callable[[list[int]], tuple[torch.Tensor, dict]],
           evaluate: Callable[[], dict[str, float]], log: Callable[[dict], None] | None) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, settings))
    before = evaluate()
    for step, idx in enumerate(minibatches(n, settings.batch_size, settings.steps, settings.seed), start=1):
        model.train()
        loss, metrics = loss_fn(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        if torch.isfinite(norm):
            optimizer.step()
        row = {"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0],
               **{k: float(v) for k, v in metrics.items()}}
        schedule.step()
        if settings.eval_every and step % settings.eval_every == 0 and step < settings.steps:
            row.update({f"eval/{k}": v for k, v in evaluate().items()})
        if log is not None:
            log(row)
    after = evaluate()
    return {**{f"before/{k}": v for k, v in before.items()}, **{f"after/{k}": v for k, v in after.items()}}


def _save(model, tokenizer_path: str, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(out)
    return out


def sft(model_path: str, out_dir: str | Path, train: Sequence[Demonstration], test: Sequence[Demonstration],
        settings: StageSettings, log: Callable[[dict], None] | None = None) -> dict[str, float]:
    """Supervised fine-tuning; returns held-out response-token loss and accuracy before/after."""
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    def token_stats(rows: Sequence[Demonstration]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pack([r.prompt_ids for r in rows], [r.response_ids for r in rows], _pad_id(model))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits[:, batch.prompt_width - 1 : -1].float()
        logprobs = logprobs_from_logits(logits, batch.response_ids)
        correct = (logits.argmax(-1) == batch.response_ids).float()
        mask = batch.response_mask * pad_rows([r.loss_mask or [1] * len(r.response_ids) for r in rows],
                                              batch.response_mask.shape[1])
        return -masked_mean(logprobs, mask), masked_mean(correct, mask)

    def loss_fn(idx: list[int]) -> tuple[torch.Tensor, dict]:
        loss, accuracy = token_stats([train[i] for i in idx])
        return loss, {"token_accuracy": accuracy.item()}

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        loss, accuracy = token_stats(list(test))
        return {"loss": loss.item(), "token_accuracy": accuracy.item()}

    result = _train(model, settings, len(train), loss_fn, evaluate, log)
    model.generation_config.do_sample = True
    _save(model, model_path, out_dir)
    return result


def _output_head(model_path: str) -> torch.nn.Module:
    """The language-model head of the causal LM in `model_path` (a trainable copy)."""
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"rm.lm_coef > 0 needs a causal LM with an output head to start from; {model_path} has none")
    return copy.deepcopy(head).requires_grad_(True)


def train_reward_model(model_path: str, out_dir: str | Path, train: Sequence[PreferencePair],
                       test: Sequence[PreferencePair], settings: StageSettings,
                       log: Callable[[dict], None] | None = None, lora_rank: int | None = None,
                       lm_coef: float = 0.0) -> dict[str, float]:
    """Bradley–Terry training of a one-label sequence classifier started from `model_path`;
    returns held-out pairwise accuracy before/after. With `lora_rank`, only LoRA adapters (and
    the head) train; the saved model has them merged, so the reward service loads a plain folder.

    `lm_coef` > 0 adds the language-model loss on the chosen responses, weighted by it, read from
    the same final hidden states through the starting model's output head (trained along, not
    saved): the backbone keeps learning to produce the good answers while it learns to rank
    them, which regularises the reward model against features that only separate the training
    pairs (Yang et al. 2024, "generalizable reward models" by hidden-state regularisation)."""
    torch.manual_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    lm_head = _output_head(model_path) if lm_coef > 0 else None
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, task_type="SEQ_CLS",
                                                 target_modules=lora_targets(model, "auto")))
    trained = torch.nn.ModuleList([model] + ([lm_head] if lm_head is not None else []))

    def forward(rows: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Scores of the chosen [B] and rejected [B] responses, and the chosen responses'
        language-model NLL (token mean; None without `lm_coef`)."""
        prompts = [r.prompt_ids for r in rows] * 2
        responses = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
        batch = pack(prompts, responses, _pad_id(model))
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, output_hidden_states=lm_head is not None)
        scores = out.logits[:, 0].float()
        nll = None
        if lm_head is not None:  # hidden_states[-1] is the normed state the score head reads
            n = len(rows)
            hidden = out.hidden_states[-1][:n, batch.prompt_width - 1 : -1]
            logprobs = logprobs_from_logits(lm_head(hidden).float(), batch.response_ids[:n])
            nll = -masked_mean(logprobs, batch.response_mask[:n])
        return scores[: len(rows)], scores[len(rows) :], nll

    def loss_fn(idx: list[int]) -> tuple[torch.Tensor, dict]:
        chosen, rejected, nll = forward([train[i] for i in idx])
        loss, metrics = reward_model_loss(chosen, rejected)
        metrics = {k: v.item() for k, v in metrics.items()}
        if nll is not None:
            loss = loss + lm_coef * nll
            metrics["lm_loss"] = nll.item()
        return loss, metrics

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        trained.eval()
        chosen, rejected, nll = forward(list(test))
        loss, metrics = reward_model_loss(chosen, rejected)
        return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()},
                **accuracy_by_kind(test, chosen > rejected), **({"lm_loss": nll.item()} if nll is not None else {})}

    result = _train(trained, settings, len(train), loss_fn, evaluate, log)
    if lora_rank is not None:
        model = model.merge_and_unload()
    _save(model, model_path, out_dir)
    return result


def dpo(model_path: str, out_dir: str | Path, train: Sequence[PreferencePair], test: Sequence[PreferencePair],
        settings: StageSettings, beta: float, log: Callable[[dict], None] | None = None) -> dict[str, float]:
    """DPO against a frozen copy of the starting policy; returns the held-out margin
    β·[(logπ_w − logπ_ref,w) − (logπ_l − logπ_ref,l)] and accuracy before/after."""
    torch.manual_seed(settings.seed)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval().requires_grad_(False)

    def logps(model, rows: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [r.prompt_ids for r in rows] * 2
        seq = _sequence_logprobs(model, prompts, [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows])
        return seq[: len(rows)], seq[len(rows) :]

    def loss_on(rows: Sequence[PreferencePair]) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            ref_w, ref_l = logps(reference, rows)
        pol_w, pol_l = logps(policy, rows)
        loss, metrics = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta)
        margin = metrics["chosen_reward"] - metrics["rejected_reward"]
        return loss, {"margin": margin.item(), "accuracy": metrics["accuracy"].item()}

    def evaluate() -> dict[str, float]:
        policy.eval()
        with torch.no_grad():
            ref_w, ref_l = logps(reference, list(test))
            pol_w, pol_l = logps(policy, list(test))
        loss, metrics = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta)
        margin = metrics["chosen_reward"] - metrics["rejected_reward"]
        return {"loss": loss.item(), "margin": margin.item(), "accuracy": metrics["accuracy"].item(),
                **accuracy_by_kind(test, (pol_w - ref_w) > (pol_l - ref_l))}

    result = _train(policy, settings, len(train), lambda idx: loss_on([train[i] for i in idx]), evaluate, log)
    _save(policy, model_path, out_dir)
    return result

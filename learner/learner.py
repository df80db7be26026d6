"""The learner: policy (and critic) training with clipped PPO-family updates.

A plain class; `deploy/` makes it a Ray actor. One step:
  prepare(rollouts)   old log-probs and values with the weights that generated the rollouts
  train_step(exp)     token rewards → advantages (estimator registry) → `ppo_epochs` ×
                      minibatches of policy loss (+ value loss, + KL loss, − entropy bonus),
                      each minibatch accumulated over micro-batches under a token budget
  publish()           the new weights (LoRA merged) as safetensors chunks

With one update per batch (`reuses_update_logprobs`), `prepare` is skipped: the old log-probs
are the update's own forward pass, detached. Micro-batches pass the minibatch's token and
sequence counts to the loss, so their summed gradients equal one pass over the minibatch. A
non-finite gradient norm skips that optimizer step (`learner/skipped_steps`). Each epoch's
minibatch order is drawn from a generator seeded by (seed, step): a resumed run repeats it.

Notation: B responses, T longest response in the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rlfleet.common.collate import pack
from rlfleet.common.config import RunConfig
from rlfleet.common.records import Experience, Prepared, Rollout, ScoreBatch, StepResult
from rlfleet.common.registry import import_plugins
from rlfleet.common.reward_scale import RewardScaler
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.learner.algos import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    rollout_correction,
    value_loss,
)
from rlfleet.learner.learner_state import load_learner, save_learner
from rlfleet.learner.memory import LearnerMemory, onloaded
from rlfleet.learner.models import (
    PolicyWeights,
    autocast,
    collision_rows,
    disabled_adapter,
    iter_full_weights,
    load_critic,
    load_policy,
    load_reference,
    response_logprobs,
    response_values,
    trainable_parameters,
)
from rlfleet.learner.objective import (
    advantage_inputs,
    estimator_info,
    loss_params,
    policy_objective,
)
from rlfleet.learner.optim import NonFiniteError, adamw_with_schedule, guarded_step  # noqa: F401  (re-exported)
from rlfleet.learner.parallel import DataParallel
from rlfleet.learner.step_data import (
    StaleRolloutError,  # noqa: F401  (raised here, through check_versions)
    StepTensors,
    check_versions,
    correction,
    correction_kwargs,
    resolved,
    scatter_rows,
    step_batch,
    step_rewards,
    token_budget_batches,
)
from rlfleet.learner.step_metrics import UpdateMetrics, batch_metrics, check_mismatch
from rlfleet.weight_sync.base import WeightSync


class Learner(LearnerMemory):
    """Holds the policy, the critic (PPO with GAE) and their optimizers (where their state lives,
    `learner.offload`: `learner/memory.py`)."""

    def __init__(self, config: RunConfig, policy_path: str, critic_path: str | None = None,
                 threads: ThreadBudget | None = None):
        """`threads`: the actor's thread budget (None leaves this process's threads alone)."""
        apply_thread_budget(threads)
        import_plugins(config.plugins)  # estimators and losses registered outside the package
        self._cfg = config
        torch.manual_seed(config.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        autocast(self.device, config.model.dtype)  # a dtype this device cannot compute in fails here
        ckpt = config.model.gradient_checkpointing
        self.policy = load_policy(policy_path, config.model.lora, self.device, ckpt)
        self._pad_id = self.policy.config.pad_token_id or 0
        self.critic = None
        if estimator_info(config.algorithm).needs_critic:
            self.critic = load_critic(critic_path or policy_path, self.device, ckpt)
        colocated = config.reference.enabled and config.reference.colocate_with_learner
        self._reference = load_reference(policy_path, self.policy, self.device) if colocated else None
        self.rewards = RewardScaler.of(config.reward)
        """The reward model's score normalisation (its statistics are checkpointed here)."""
        self._build_optimizers()
        algo = config.algorithm
        if algo.kl_target is None:
            self.kl_controller = FixedKLController(algo.kl_coef)
        else:
            self.kl_controller = AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
        self.version = 0
        self.step = 0
        self.skipped_steps = 0
        self._skips_in_a_row: dict[int, int] = {}
        self._senders: dict[str, Any] = {}
        self._dp = DataParallel()

    def _build_optimizers(self) -> None:
        """AdamW and its schedule for the policy (and critic), over the current parameters
        (rebuilt after FSDP has replaced them by their shards)."""
        lc = self._cfg.learner
        batch = self._cfg.rollout.prompts_per_step * self._cfg.rollout.samples_per_prompt
        total = self._cfg.total_steps * lc.ppo_epochs * math.ceil(batch / lc.minibatch_size)
        self.optimizer, self.scheduler = adamw_with_schedule(trainable_parameters(self.policy), lc.lr, lc, total)
        self.critic_optimizer = self.critic_scheduler = None
        if self.critic is not None:
            self.critic_optimizer, self.critic_scheduler = adamw_with_schedule(
                trainable_parameters(self.critic), lc.critic_lr, lc, total
            )

    # ------------------------------------------------------------------ queries
    def scale_kl_coef(self, factor: float) -> float:
        """Multiply the KL coefficient β by `factor` (the over-optimisation guard); the new β."""
        self.kl_controller.value *= factor
        return self.kl_controller.value

    def policy_version(self) -> int:
        return self.version

    @property
    def rank(self) -> int:
        """This learner's rank in its data-parallel group (0 alone)."""
        return self._dp.rank

    def scale_scores(self, scored: ScoreBatch) -> list[float | None]:
        """`scored`'s scores as this learner would train on them (evaluation: no statistics move)."""
        return self.rewards(scored.scores, scored.components, scored.weights, update=False)

    # ------------------------------------------------------------------ prepare
    @onloaded
    @torch.no_grad()
    def prepare(self, rollouts: Sequence[Rollout]) -> Prepared:
        """Old log-probs and values (and colocated reference log-probs) of every response."""
        check_versions(rollouts, self.version, self._cfg.rollout.max_staleness)
        temp = self._cfg.rollout.temperature
        old = [[] for _ in rollouts]
        values = [[] for _ in rollouts] if self.critic is not None else None
        ref = [[] for _ in rollouts] if self._reference is not None else None
        micros = list(self._micro_batches(rollouts, range(len(rollouts))))
        # Sharded, every rank runs as many forward passes as the busiest (idle ones on a
        # one-token batch, results dropped); a rank may even have no rollouts at all.
        micros += [[]] * (self._dp.rounds(len(micros)) - len(micros))
        self.policy.eval()
        try:
            for micro in micros:
                batch = self._pack([rollouts[i] for i in micro]) if micro else self._idle_batch()
                with autocast(self.device, self._cfg.model.dtype):
                    scatter_rows(old, micro, response_logprobs(self.policy, batch, temp)[0], rollouts)
                    if values is not None:
                        scatter_rows(values, micro, response_values(self.critic, batch), rollouts)
                    if ref is not None:
                        scatter_rows(ref, micro, self._reference_logprobs(batch, temp), rollouts)
        finally:
            self.policy.train()
        return Prepared(old, values, ref)

    def _reference_logprobs(self, batch, temperature: float) -> torch.Tensor:
        if self._reference == "base":
            with disabled_adapter(self.policy):
                return response_logprobs(self.policy, batch, temperature)[0]
        return response_logprobs(self._reference, batch, temperature)[0]

    # ------------------------------------------------------------------ train
    @onloaded
    def train_step(self, exp: Experience) -> StepResult:
        """One PPO-family update on a scored batch; returns the new version and the metrics.
        `exp.old_logprobs` None: the update's own log-probs serve (`reuses_update_logprobs`)."""
        cfg, algo = self._cfg, self._cfg.algorithm
        exp = resolved(exp, self.rewards)
        rollouts = exp.rollouts
        check_versions(rollouts, self.version, cfg.rollout.max_staleness)
        b = step_batch(cfg, exp, self.device)
        mask, old, vllm_lp, ref, values, scores, group_ids = (b.mask, b.old, b.vllm_lp, b.ref, b.values, b.scores,
                                                              b.group_ids)
        fill_old, width = b.fill_old, mask.shape[1]
        # Without old log-probs yet, the KL (then only in the loss and the metrics) comes after the update.
        kl = torch.zeros_like(mask) if ref is None or fill_old else kl_penalty(old, ref, algo.kl_estimator) * mask
        beta = self.kl_controller.value
        reward_beta = beta if algo.kl_in == "reward" else 0.0
        rc = correction(cfg)
        is_weights, loss_mask = None, mask
        if not fill_old:  # decoupled PPO filling π_prox in the update weighs its tokens there
            is_weights, loss_mask, _ = rollout_correction(old, vllm_lp, mask, **correction_kwargs(rc))
        stats = self._collision(rollouts, width) if estimator_info(algo).needs_old_logprobs else (None, None)
        inputs = advantage_inputs(algo, exp, step_rewards(cfg, rollouts, scores, kl, mask, reward_beta), scores,
                                  group_ids, mask, values, *stats, is_weights)
        advantages, returns = ADVANTAGE_ESTIMATORS[algo.advantage_estimator](inputs)
        tensors = StepTensors(loss_mask, old, advantages, returns, ref, values, is_weights,
                              vllm_lp if rc.enabled and fill_old else None)
        update = UpdateMetrics()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        for _ in range(cfg.learner.ppo_epochs):
            order = torch.randperm(len(rollouts), generator=generator).tolist()
            for start in range(0, len(order), cfg.learner.minibatch_size):
                self._minibatch(rollouts, order[start : start + cfg.learner.minibatch_size], tensors, beta, update,
                                fill_old)
        if fill_old:
            old = self._dp.sum(old)  # every row was filled by the one rank that trained it
            if ref is not None:
                kl = kl_penalty(old, ref, algo.kl_estimator) * mask
        _, _, corrected = rollout_correction(old, vllm_lp, mask, **correction_kwargs(rc))
        metrics: dict[str, float | None] = {
            **batch_metrics(rollouts, scores, group_ids, mask, old, vllm_lp, kl, reward_beta),
            **{name: float(value) for name, value in corrected.items()},
            **UpdateMetrics.merged(self._dp.gather(update)).result(),
            "learner/kl_coef": beta,
            "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/skipped_steps": float(self.skipped_steps),
        }
        if self.critic is None:
            metrics.update({"loss/value_avg": None, "val/clipfrac_avg": None})
        metrics["rollout/logprob_diff_same_version"] = check_mismatch(cfg, rollouts, self.version, old, vllm_lp, mask)
        self.kl_controller.update(metrics["objective/kl"], len(rollouts))
        self.step += 1
        self.version += 1
        metrics["learner/version"] = float(self.version)
        return StepResult(self.version, metrics)

    def _minibatch(self, rollouts, idx: list[int], tensors: StepTensors, beta: float, update: UpdateMetrics,
                   fill_old: bool = False) -> None:
        algo, dp = self._cfg.algorithm, self._dp
        sub = tensors.rows(idx, tensors.mask.shape[1])
        norms = {
            "num_global_tokens": sub.mask.sum(),
            "num_global_seqs": int(sub.mask.bool().any(-1).sum()),  # the minibatch's non-empty rows
            "norm_length": tensors.mask.shape[1],
        }
        params = loss_params(algo, torch.Generator().manual_seed(self._cfg.seed * 1_000_003 + self.step))
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)
        mine = dp.share(idx, [len(r.prompt_ids) + len(r.response_ids) for r in rollouts])
        micros: list[list[int] | None] = list(self._micro_batches(rollouts, mine))
        # Every rank takes part in every gradient collective: a rank with an empty share (or,
        # sharded, fewer micro-batches than the busiest) runs one sequence at weight 0.
        micros += [None] * (max(dp.rounds(len(micros)), 1) - len(micros))
        models = [m for m in (self.policy, self.critic) if m is not None]
        policy_total = value_total = 0.0
        finite = True
        for n, real in enumerate(micros):
            micro = real or idx[:1]
            weight = float(dp.world_size) if real else 0.0  # the ranks' gradients are averaged
            batch = self._pack([rollouts[i] for i in micro])
            t = tensors.rows(micro, batch.response_mask.shape[1])
            with dp.no_sync(n < len(micros) - 1, models):
                with autocast(self.device, self._cfg.model.dtype):
                    logp, entropy = response_logprobs(dp.module(self.policy), batch, self._cfg.rollout.temperature,
                                                      with_entropy=True)
                if fill_old:
                    t = replace(t, old_logprobs=logp.detach())
                    if t.behaviour is not None:  # token-level weights only (`reuses_update_logprobs`)
                        weights, _, _ = rollout_correction(t.old_logprobs, t.behaviour, t.mask,
                                                           **correction_kwargs(correction(self._cfg)))
                        t = replace(t, is_weights=weights)
                    if real:
                        rows = torch.tensor(real, device=logp.device)
                        tensors.old_logprobs[rows, : logp.shape[1]] = t.old_logprobs
                loss, pg, pm = policy_objective(algo, logp, entropy, t, beta, norms, params)
                (weight * loss).backward()
                if self.critic is not None:
                    with autocast(self.device, self._cfg.model.dtype):
                        v = response_values(dp.module(self.critic), batch)
                    vl, vm = value_loss(v, t.values, t.returns, t.mask, algo.value_clip, algo.loss_agg, **norms)
                    (weight * algo.value_loss_coef * vl).backward()
            if not real:
                continue
            finite = finite and bool(torch.isfinite(loss))
            policy_total += pg.item()
            update.add_policy_micro(batch.attention_mask, t.mask, logp, t.old_logprobs, entropy, pm)
            if self.critic is not None:
                value_total += vl.item()
                update.add_micro(t.mask.sum().item(), {"val/clipfrac_avg": vm["vf_clipfrac"]})
        grad_norm = self._optimizer_step(self.policy, self.optimizer, self.scheduler, dp.all_true(finite))
        update.add_minibatch("loss/policy_avg", policy_total)
        update.add_minibatch("learner/grad_norm", grad_norm)
        if self.critic is not None:
            value_ok = dp.all_true(math.isfinite(value_total))
            self._optimizer_step(self.critic, self.critic_optimizer, self.critic_scheduler, value_ok)
            update.add_minibatch("loss/value_avg", value_total)

    def _optimizer_step(self, model, optimizer, scheduler, finite_loss: bool = True) -> float:
        """Clip and step; a non-finite gradient norm (or loss) skips the step and counts it."""
        lc = self._cfg.learner
        try:
            norm = guarded_step(model, optimizer, scheduler, finite_loss, lc.max_grad_norm, lc.max_skips_in_a_row,
                                self._skips_in_a_row)
        except NonFiniteError:
            self.skipped_steps += 1
            raise
        self.skipped_steps += math.isnan(norm)
        return norm

    def _micro_batches(self, rollouts: Sequence[Rollout], idx) -> Iterator[list[int]]:
        """Micro-batches under the token budget, bucketed: sequences sorted by length, so that
        each pads to a width close to its own (`learner/padding_fraction`)."""
        lengths = [(len(r.prompt_ids), len(r.response_ids)) for r in rollouts]
        by_length = sorted(idx, key=lambda i: (sum(lengths[i]), i))
        return token_budget_batches(lengths, by_length, self._cfg.learner.micro_batch_tokens)

    def _collision(self, rollouts: Sequence[Rollout], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(old log-probs, Σπ²) [B, T] under the current weights, every rank the whole batch (the
        optimal token baselines need a group's rows together)."""
        micros = [(m, self._pack([rollouts[i] for i in m])) for m in self._micro_batches(rollouts, range(len(rollouts)))]
        with autocast(self.device, self._cfg.model.dtype):
            return collision_rows(self.policy, micros, width, self._cfg.rollout.temperature)

    def _pack(self, rollouts: Sequence[Rollout]):
        return pack([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], self._pad_id).to(self.device)

    def _idle_batch(self):
        """A one-token prompt and response: the forward pass of a rank with nothing to do."""
        return pack([[self._pad_id]], [[self._pad_id]], self._pad_id).to(self.device)

    # ------------------------------------------------------------------ publishing
    # Sharded (FSDP), gathering the full weights is a collective: every rank calls these
    # methods together and only rank 0 publishes (`LearnerGroup` arranges it).
    @onloaded
    def publish_state(self) -> dict[str, torch.Tensor]:
        """The policy's weights as transformers / vLLM name them (LoRA merged), on rank 0."""
        return self.gathered(iter_full_weights(self.policy))

    def weight_call(self, sync: WeightSync, op: str, *args: Any) -> Any:
        """Run operation `op` of weight-sync method `sync`'s sender (`rlfleet.weight_sync`)."""
        return getattr(self._sender(sync), op)(*args)

    def weight_stream(self, sync: WeightSync, op: str, *args: Any) -> Iterator[Any]:
        """`weight_call` for an operation that yields (a Ray streaming generator at assembly:
        e.g. each safetensors chunk becomes its own object as soon as it is full)."""
        # A plain loop, not `yield from`: Ray drives the generator with send(), which a list
        # iterator does not have.
        for item in getattr(self._sender(sync), op)(*args):  # noqa: UP028
            yield item

    def _sender(self, sync: WeightSync) -> Any:
        self._onload()
        if sync.name not in self._senders:
            self._senders[sync.name] = sync.sender(PolicyWeights(self.policy, self.rank))
        return self._senders[sync.name]

    def gathered(self, weights: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Rank 0: the whole state dict; other ranks take part in the gathers and keep nothing."""
        out = {}
        for name, tensor in weights:
            if self._dp.rank == 0:
                out[name] = tensor
        return out

    # ------------------------------------------------------------------ data parallelism
    def open_dp_group(self, world_size: int) -> tuple[str, int]:
        """Rank 0 of a data-parallel group: serve its rendezvous; returns (host, port)."""
        return self._dp.open(world_size)

    def join_dp_group(self, rank: int, world_size: int, host: str, port: int) -> None:
        """Join the group as `rank` (every rank calls this at once, rank 0 included)."""
        models = [self.policy] + ([self.critic] if self.critic is not None else [])
        frozen = [self._reference] if isinstance(self._reference, torch.nn.Module) else []
        self._dp.join(rank, world_size, host, port, self.device, models, self._cfg.learner.strategy, frozen)
        if self._dp.sharded:
            self._build_optimizers()

    # ------------------------------------------------------------------ checkpoints
    @onloaded
    def save(self, folder: str) -> None:
        """Policy (HF format; with LoRA also the adapter in PEFT format), critic, optimizers,
        schedulers, KL controller, RNG, counters: safetensors and JSON, no pickles. Every rank
        of a group calls it (sharded state is gathered); rank 0 writes."""
        save_learner(self, Path(folder))

    @onloaded
    def load(self, folder: str, reward_state: dict | None = None) -> int:
        """Restore everything `save` wrote, with any number of ranks; returns the restored version.
        `reward_state`: a checkpoint's normaliser written by the reward service (before 2026-11)."""
        load_learner(self, Path(folder), reward_state)
        return self.version

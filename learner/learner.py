"""The learner: policy (and critic) training with clipped PPO-family updates.

A plain class; `deploy/` makes it a Ray actor. One step:
  prepare(rollouts)   old log-probs and values with the weights that generated the rollouts
  train_step(exp)     token rewards → advantages (estimator registry) → `ppo_epochs` ×
                      minibatches of policy loss (+ value loss, + KL loss, − entropy bonus),
                      each minibatch accumulated over micro-batches under a token budget
  publish()           the new weights (LoRA merged) as safetensors chunks

With one update per batch (`reuses_update_logprobs`), `prepare` is skipped: the old
log-probs are the update's own forward pass, detached (the ratio is exactly 1, as a separate
pass with the same weights would give), saving one forward pass over the batch per step.

Micro-batches pass the minibatch's token and sequence counts to `agg_loss`, so their summed
gradients equal one pass over the whole minibatch. A non-finite gradient norm skips that
optimizer step (counted in `learner/skipped_steps`). The minibatch order of every epoch is
drawn from a generator seeded by (seed, step), so a resumed run repeats it exactly.

Notation: B responses, T longest response in the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from rlfleet.common.collate import pack, pad_rows
from rlfleet.common.config import RunConfig
from rlfleet.common.records import Experience, Prepared, Rollout, ScoreBatch, StepResult
from rlfleet.common.reward_scale import RewardScaler
from rlfleet.common.threads import ThreadBudget, apply_thread_budget
from rlfleet.common.weights import WeightGroupInfo
from rlfleet.learner.algos import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    agg_loss,
    kl_penalty,
    rollout_correction,
    value_loss,
)
from rlfleet.learner.models import (
    autocast,
    disabled_adapter,
    full_tensor,
    is_lora,
    iter_full_weights,
    load_critic,
    load_policy,
    load_reference,
    response_collision,
    response_logprobs,
    response_values,
    trainable_parameters,
    weight_layout,
)
from rlfleet.learner.objective import advantage_inputs, estimator_info, loss_params
from rlfleet.learner.optim import adamw_with_schedule, scheduler_state
from rlfleet.learner.parallel import DataParallel
from rlfleet.learner.state_io import (
    load_model_state,
    load_optimizer,
    load_rng,
    optimizer_state,
    read_json,
    save_optimizer,
    save_rng,
    write_json,
)
from rlfleet.learner.step_data import (
    StaleRolloutError,  # noqa: F401  (raised here, through check_versions)
    StepTensors,
    behaviour_ratio,
    check_versions,
    correction,
    correction_kwargs,
    loss_mask_row,
    resolved,
    reuses_update_logprobs,
    scatter_rows,
    step_rewards,
    token_budget_batches,
)
from rlfleet.learner.step_metrics import UpdateMetrics, batch_metrics, check_mismatch
from rlfleet.learner.weights import WeightBroadcaster, check_finite, object_store_chunks


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Learner:
    """Holds the policy, the critic (PPO with GAE) and their optimizers."""

    def __init__(self, config: RunConfig, policy_path: str, critic_path: str | None = None,
                 threads: ThreadBudget | None = None):
        """`threads`: the actor's thread budget (None leaves this process's threads alone)."""
        apply_thread_budget(threads)
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
        self._broadcaster = WeightBroadcaster()
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

    def scale_scores(self, scored: ScoreBatch) -> list[float | None]:
        """`scored`'s scores as this learner would train on them (evaluation: no statistics move)."""
        return self.rewards(scored.scores, scored.components, scored.weights, update=False)

    def parameter_snapshot(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter (policy and critic) by name, on the CPU: for tests and audits."""
        out = {f"policy.{n}": full_tensor(p).cpu().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        if self.critic is not None:
            out.update({f"critic.{n}": full_tensor(p).cpu().clone() for n, p in self.critic.named_parameters()})
        return out

    def local_numel(self) -> int:
        """Parameters this rank holds (its shards under FSDP): policy, critic and reference."""
        models = [self.policy, self.critic, self._reference]
        return sum(_local(p).numel() for m in models if isinstance(m, torch.nn.Module) for p in m.parameters())

    # ------------------------------------------------------------------ prepare
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
    def train_step(self, exp: Experience) -> StepResult:
        """One PPO-family update on a scored batch; returns the new version and the metrics.
        `exp.old_logprobs` None: the update's own log-probs serve (`reuses_update_logprobs`)."""
        cfg, algo = self._cfg, self._cfg.algorithm
        exp = resolved(exp, self.rewards)
        rollouts = exp.rollouts
        width = max(max(len(r.response_ids) for r in rollouts), 1)
        dev = self.device
        mask = pad_rows([loss_mask_row(r, algo) for r in rollouts], width).to(dev)
        check_versions(rollouts, self.version, cfg.rollout.max_staleness)
        fill_old = exp.old_logprobs is None and not behaviour_ratio(cfg)
        if fill_old:
            if not reuses_update_logprobs(cfg) or len(rollouts) > cfg.learner.minibatch_size:
                raise ValueError(
                    "Experience.old_logprobs is None, but this config needs them before its update (more than "
                    "one epoch or minibatch, a critic, KL in the rewards, a colocated reference or TIS): "
                    "call prepare() first"
                )
        vllm_lp = pad_rows([r.logprobs for r in rollouts], width).to(dev)
        if behaviour_ratio(cfg):
            old = vllm_lp  # asynchronous, the ratio against the behaviour policy
        else:
            old = torch.zeros_like(mask) if fill_old else pad_rows(exp.old_logprobs, width).to(dev)
        ref = pad_rows(exp.ref_logprobs, width).to(dev) if exp.ref_logprobs is not None else None
        values = pad_rows(exp.values, width).to(dev) if exp.values is not None else None
        scores = torch.tensor(exp.scores, dtype=torch.float32, device=dev)
        group_ids = torch.tensor(exp.group_ids, device=dev)
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
                pg, pm = POLICY_LOSSES[algo.policy_loss](
                    logp, t.old_logprobs, t.advantages, t.mask, agg=algo.loss_agg, token_weights=t.is_weights,
                    **norms, **params,
                )
                loss = pg
                if algo.kl_in == "loss":
                    loss = loss + beta * agg_loss(kl_penalty(logp, t.ref_logprobs, algo.kl_estimator), t.mask,
                                                  algo.loss_agg, **norms)
                if algo.entropy_coef > 0:
                    loss = loss - algo.entropy_coef * agg_loss(entropy, t.mask, algo.loss_agg, **norms)
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
            tokens = t.mask.sum().item()
            # weighted by the padded size: the token-weighted mean is Σ padding / Σ padded tokens
            padded = batch.attention_mask.numel()
            update.add_micro(padded, {"learner/padding_fraction": 1.0 - batch.attention_mask.sum().item() / padded})
            approxkl = 0.5 * (logp.detach() - t.old_logprobs).square()
            update.add_micro(tokens, {"policy/approxkl_avg": _token_mean(approxkl, t.mask),
                                      "policy/clipfrac_avg": float(pm.get("pg_clipfrac", 0.0)),
                                      "policy/entropy_avg": _token_mean(entropy, t.mask)})
            update.add_ratios(torch.exp((logp - t.old_logprobs).clamp(-20, 20)), t.mask)
            if self.critic is not None:
                value_total += vl.item()
                update.add_micro(tokens, {"val/clipfrac_avg": vm["vf_clipfrac"]})
        grad_norm = self._optimizer_step(self.policy, self.optimizer, self.scheduler, dp.all_true(finite))
        update.add_minibatch("loss/policy_avg", policy_total)
        update.add_minibatch("learner/grad_norm", grad_norm)
        if self.critic is not None:
            value_ok = dp.all_true(math.isfinite(value_total))
            self._optimizer_step(self.critic, self.critic_optimizer, self.critic_scheduler, value_ok)
            update.add_minibatch("loss/value_avg", value_total)

    def _optimizer_step(self, model, optimizer, scheduler, finite_loss: bool = True) -> float:
        """Clip and step; a non-finite gradient norm (or loss) skips the step and counts it."""
        limit = self._cfg.learner.max_skips_in_a_row
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable_parameters(model), self._cfg.learner.max_grad_norm))
        if not (finite_loss and torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._skips_in_a_row[id(optimizer)] = run = self._skips_in_a_row.get(id(optimizer), 0) + 1
            if run >= limit:
                raise NonFiniteError(
                    f"{run} optimizer steps in a row had a non-finite loss or gradient "
                    f"(learner.max_skips_in_a_row={limit}); stopping before the weights are published or saved"
                )
            return float("nan")
        self._skips_in_a_row[id(optimizer)] = 0
        optimizer.step()
        scheduler.step()
        return norm.item()

    def _micro_batches(self, rollouts: Sequence[Rollout], idx) -> Iterator[list[int]]:
        """Micro-batches under the token budget, bucketed: sequences sorted by length, so that
        each pads to a width close to its own (`learner/padding_fraction`)."""
        lengths = [(len(r.prompt_ids), len(r.response_ids)) for r in rollouts]
        by_length = sorted(idx, key=lambda i: (sum(lengths[i]), i))
        return token_budget_batches(lengths, by_length, self._cfg.learner.micro_batch_tokens)

    @torch.no_grad()
    def _collision(self, rollouts: Sequence[Rollout], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(old log-probs, Σπ²) [B, T] of every response under the current weights (every rank
        computes the whole batch: the optimal token baselines need the group's rows together)."""
        old, collision = ([[] for _ in rollouts] for _ in range(2))
        temp = self._cfg.rollout.temperature
        for micro in self._micro_batches(rollouts, range(len(rollouts))):
            with autocast(self.device, self._cfg.model.dtype):
                logp, sum_sq = response_collision(self.policy, self._pack([rollouts[i] for i in micro]), temp)
            scatter_rows(old, micro, logp, rollouts)
            scatter_rows(collision, micro, sum_sq, rollouts)
        return pad_rows(old, width).to(self.device), pad_rows(collision, width).to(self.device)

    def _pack(self, rollouts: Sequence[Rollout]):
        return pack([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], self._pad_id).to(self.device)

    def _idle_batch(self):
        """A one-token prompt and response: the forward pass of a rank with nothing to do."""
        return pack([[self._pad_id]], [[self._pad_id]], self._pad_id).to(self.device)

    # ------------------------------------------------------------------ publishing
    # Sharded (FSDP), gathering the full weights is a collective: every rank calls these
    # methods together and only rank 0 publishes (`LearnerGroup` arranges it).
    def publish_state(self) -> dict[str, torch.Tensor]:
        """The policy's weights as transformers / vLLM name them (LoRA merged), on rank 0."""
        return self._gathered(iter_full_weights(self.policy))

    def publish(self) -> Iterator[bytes]:
        """The current weights as safetensors chunks (a Ray streaming generator at assembly:
        each chunk becomes its own object, fetched once per node by the rollout workers).
        Sharded weights are gathered tensor by tensor as the chunks fill."""
        weights = iter_full_weights(self.policy)
        if self._dp.rank != 0:
            for _ in weights:
                pass
            return
        # A plain loop, not `yield from`: Ray drives the generator with send(), which a list
        # iterator does not have.
        for chunk in object_store_chunks(weights):  # noqa: UP028
            yield chunk

    def open_weight_group(self, world_size: int) -> WeightGroupInfo:
        """Rank 0 of a broadcast push (see `BroadcastWeights`); plans from shapes alone."""
        return self._broadcaster.open(weight_layout(self.policy), world_size)

    def broadcast_weights(self) -> int:
        weights = iter_full_weights(self.policy)
        if self._dp.rank != 0:
            for _ in weights:
                pass
            return 0
        return self._broadcaster.send(weights)

    def _gathered(self, weights: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
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
    def save(self, folder: str) -> None:
        """Policy (HF format; with LoRA also the adapter in PEFT format), critic, optimizers,
        schedulers, KL controller, RNG, counters: safetensors and JSON, no pickles. Every rank
        of a group calls it (sharded state is gathered); rank 0 writes."""
        out = Path(folder)
        policy = self.publish_state()
        adapter = self._gathered((n, full_tensor(t)) for n, t in self.policy.state_dict().items() if "lora_" in n)
        critic = self._gathered(iter_full_weights(self.critic)) if self.critic is not None else None
        optimizers = {"optimizer": optimizer_state(self.policy, self.optimizer)}
        if self.critic is not None:
            optimizers["critic_optimizer"] = optimizer_state(self.critic, self.critic_optimizer)
        if self._dp.rank != 0:
            return
        for state in (policy, critic or {}):
            check_finite(state, action="save")  # nothing is written
        out.mkdir(parents=True, exist_ok=True)
        base = self.policy.get_base_model() if is_lora(self.policy) else self.policy
        base.save_pretrained(out / "policy", state_dict=policy, safe_serialization=True)
        if is_lora(self.policy):
            self.policy.save_pretrained(out / "adapter", state_dict=adapter, safe_serialization=True)
        if critic is not None:
            self.critic.save_pretrained(out / "critic", state_dict=critic, safe_serialization=True)
        for name, state in optimizers.items():
            save_optimizer(state, out, name)
        save_rng(out)
        write_json(out / "learner.json", {
            "step": self.step,
            "version": self.version,
            "skipped_steps": self.skipped_steps,
            "scheduler": scheduler_state(self.scheduler),
            "critic_scheduler": scheduler_state(self.critic_scheduler),
            "kl_controller": self.kl_controller.state_dict(),
            "reward_normalizer": self.rewards.state_dict(),
        })

    def load(self, folder: str, reward_state: dict | None = None) -> int:
        """Restore everything `save` wrote, with any number of ranks; returns the restored version.
        `reward_state`: a checkpoint's normaliser written by the reward service (before 2026-11)."""
        src = Path(folder)
        if is_lora(self.policy):
            saved = load_file(str(src / "adapter" / "adapter_model.safetensors"))
            # peft stores each adapter weight without the adapter's name ("lora_A.weight" for
            # the model's "lora_A.default.weight").
            names = {n: n.replace(f".{self.policy.active_adapter}.", ".") for n in self.policy.state_dict() if "lora_" in n}
            load_model_state(self.policy, {n: saved[key] for n, key in names.items()}, strict=False)
        else:
            load_model_state(self.policy, load_file(str(src / "policy" / "model.safetensors")))
        load_optimizer(self.policy, self.optimizer, src, "optimizer")
        if self.critic is not None:
            load_model_state(self.critic, load_file(str(src / "critic" / "model.safetensors")))
            load_optimizer(self.critic, self.critic_optimizer, src, "critic_optimizer")
        state = read_json(src / "learner.json")
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic_scheduler is not None:
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.rewards.load_state_dict(state.get("reward_normalizer") or (reward_state or {}).get("normalizer", {}))
        self.step, self.version, self.skipped_steps = state["step"], state["version"], state["skipped_steps"]
        load_rng(src)
        return self.version


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return (x.detach() * mask).sum().item() / max(mask.sum().item(), 1.0)

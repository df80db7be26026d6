"""The data of one learner step: which responses go together in a forward pass, the per-token
tensors a minibatch slices, and when the update can make its own old log-probs.

Notation: B responses, T longest response in the step; P prompt length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from rlfleet.common.collate import pad_rows
from rlfleet.common.config import RunConfig
from rlfleet.common.config_algorithm import RolloutCorrectionConfig
from rlfleet.common.records import Experience, Held, Rollout
from rlfleet.common.reward_scale import RewardScaler
from rlfleet.learner.algos import ADVANTAGE_ESTIMATORS, token_level_rewards


def resolved(exp: Experience, rewards: RewardScaler) -> Experience:
    """`exp` with its held rows fetched from the object store and its scores as trained on:
    the reward model's component normalised (the batch moves the running statistics)."""
    cache: dict = {}
    rows = {name: value.fetch(_ray_get, cache) if isinstance(value, Held) else value
            for name in ("old_logprobs", "values", "ref_logprobs") if (value := getattr(exp, name)) is not None}
    return replace(exp, **rows, scores=rewards(exp.scores, exp.components, exp.weights))


def _ray_get(refs):
    import ray  # only for rows held in the object store: the learner runs without Ray too (gpu_check)

    return ray.get(refs)


class StaleRolloutError(ValueError):
    """Rollouts older than the learner's bound (`rollout.max_staleness`) reached it."""


def is_async(cfg: RunConfig) -> bool:
    return cfg.rollout.max_staleness > 0


def _colocated_reference(cfg: RunConfig) -> bool:
    return cfg.reference.enabled and cfg.reference.colocate_with_learner and cfg.algorithm.kl_in != "none"


def reuses_update_logprobs(cfg: RunConfig) -> bool:
    """True when a step makes one update on its whole batch and needs nothing from the old
    log-probs before it: one epoch, one minibatch, no critic (values), no KL in the token
    rewards, no colocated reference (computed with them), no rollout correction (except decoupled
    PPO's token-level weights, which the update computes from its own log-probs, token by token).
    The update's own log-probs, detached, are then the old ones (π_prox in decoupled PPO)."""
    a, lc = cfg.algorithm, cfg.learner
    batch = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    critic = ADVANTAGE_ESTIMATORS[a.advantage_estimator].info.needs_critic
    return (lc.ppo_epochs == 1 and lc.minibatch_size >= batch and not critic
            and a.kl_in != "reward" and not _colocated_reference(cfg) and _correction_in_update(cfg))


def _correction_in_update(cfg: RunConfig) -> bool:
    """The rollout correction can be computed per micro-batch from the update's own log-probs:
    none, or decoupled PPO's token-level weights alone (no batch normalisation, no rejection)."""
    rc = correction(cfg)
    if not rc.enabled:
        return True
    return decoupled(cfg) and rc.is_level == "token" and not rc.is_batch_normalize and not rc.rs_options


def decoupled(cfg: RunConfig) -> bool:
    """Decoupled PPO: asynchronous, the ratio against π_prox (the learner's weights before the
    update), each token weighted by min(π_prox/π_behav, cap)."""
    return is_async(cfg) and cfg.algorithm.off_policy == "decoupled"


def behaviour_ratio(cfg: RunConfig) -> bool:
    """Asynchronous with the ratio against the engine's log-probs (the behaviour policy)."""
    return is_async(cfg) and cfg.algorithm.off_policy == "behaviour"


def correction(cfg: RunConfig) -> RolloutCorrectionConfig:
    """The rollout correction in force (`AlgorithmConfig.correction`): decoupled PPO weighs
    tokens by min(π_prox/π_behav, 2) unless told otherwise; the behaviour ratio needs none."""
    if behaviour_ratio(cfg):
        return RolloutCorrectionConfig()
    return cfg.algorithm.correction(is_async(cfg))


def correction_kwargs(rc: RolloutCorrectionConfig) -> dict:
    """`rollout_correction`'s keyword arguments from its config."""
    return {"is_level": rc.is_level, "is_threshold": rc.is_threshold, "is_batch_normalize": rc.is_batch_normalize,
            "rs_options": rc.rs_options, "rs_threshold": rc.rs_threshold}


def needs_prepare(cfg: RunConfig) -> bool:
    """Whether the driver calls the learner's `prepare` before each update: for old log-probs
    the update cannot make itself, for critic values, for a colocated reference."""
    if behaviour_ratio(cfg):  # the old log-probs are the engine's
        return ADVANTAGE_ESTIMATORS[cfg.algorithm.advantage_estimator].info.needs_critic or _colocated_reference(cfg)
    return not reuses_update_logprobs(cfg)


def trains_on(rollout: Rollout, algorithm) -> float:
    """1 where a response's tokens get loss, 0 for one cut by the token limit when
    `algorithm.mask_truncated` (overlong filtering: no loss, KL or entropy on it)."""
    return 0.0 if algorithm.mask_truncated and rollout.finish_reason == "length" else 1.0


def loss_mask_row(rollout: Rollout, algorithm) -> list[float]:
    """The loss mask of one response [T]: 1 on tokens the policy generated, 0 on a multi-turn
    episode's observation tokens (a tool's output, the environment's answer: no loss, KL or
    entropy, and GAE steps over them), all 0 when `trains_on` says so."""
    on = trains_on(rollout, algorithm)
    if rollout.loss_mask is None:
        return [on] * len(rollout.response_ids)
    return [on * m for m in rollout.loss_mask]


def step_rewards(cfg: RunConfig, rollouts: Sequence[Rollout], scores: torch.Tensor, kl: torch.Tensor,
                 mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Token rewards [B, T]: −β·KL on every trained token, plus the score at the last one; with
    `environment.reward_at: turn`, an episode's turns' rewards each at that turn's last
    generated token instead (their sum is the score)."""
    if cfg.environment.reward_at != "turn" or not any(r.episode for r in rollouts):
        return token_level_rewards(scores, kl, mask, beta)
    placed = token_level_rewards(torch.zeros_like(scores), kl, mask, beta)
    for row, r in enumerate(rollouts):
        if r.episode is None:
            placed[row] += token_level_rewards(scores[row : row + 1], torch.zeros_like(kl[row : row + 1]),
                                               mask[row : row + 1], 0.0)[0]
            continue
        for end, reward in zip(r.episode.turn_ends, r.episode.turn_rewards, strict=True):
            placed[row, end] += reward * mask[row, end]
    return placed


def check_versions(rollouts: Sequence[Rollout], version: int, max_staleness: int) -> None:
    """Every rollout was generated by version − max_staleness … version; else StaleRolloutError."""
    bad = sorted({r.policy_version for r in rollouts if not version - max_staleness <= r.policy_version <= version})
    if bad:
        raise StaleRolloutError(
            f"rollouts of policy versions {bad} reached a learner at version {version} "
            f"(rollout.max_staleness={max_staleness}); old log-probs must come from the weights that generated "
            "them, or from at most that many versions later"
        )


@dataclass(frozen=True)
class StepTensors:
    """The step's per-token tensors [B, T] (on the learner's device)."""

    mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    is_weights: torch.Tensor | None
    behaviour: torch.Tensor | None = None
    """The engine's log-probs, where the update computes decoupled PPO's IS weights itself."""

    def rows(self, idx: Sequence[int], width: int) -> StepTensors:
        """Rows `idx`, the first `width` columns (responses are right-padded)."""
        index = torch.tensor(list(idx), device=self.mask.device)
        pick = {k: None if v is None else v[index, :width] for k, v in vars(self).items()}
        return StepTensors(**pick)


@dataclass(frozen=True)
class StepBatch:
    """A step's per-response data as padded tensors [B, T] (and [B]) on the learner's device."""

    mask: torch.Tensor
    """The loss mask before any rollout-correction rejection (`loss_mask_row`)."""
    old: torch.Tensor
    """π_old: from `prepare`; the engine's log-probs under the behaviour ratio; zeros to be filled
    by the update (`fill_old`)."""
    vllm_lp: torch.Tensor
    """The engine's log-probs."""
    ref: torch.Tensor | None
    values: torch.Tensor | None
    scores: torch.Tensor
    """[B] float32."""
    group_ids: torch.Tensor
    """[B]."""
    fill_old: bool
    """The update makes the old log-probs itself (`reuses_update_logprobs`)."""


def step_batch(cfg: RunConfig, exp: Experience, device: torch.device) -> StepBatch:
    """`exp` as padded tensors; refuses an experience without old log-probs that needs them."""
    rollouts = exp.rollouts
    width = max(max(len(r.response_ids) for r in rollouts), 1)
    mask = pad_rows([loss_mask_row(r, cfg.algorithm) for r in rollouts], width).to(device)
    fill_old = exp.old_logprobs is None and not behaviour_ratio(cfg)
    if fill_old and (not reuses_update_logprobs(cfg) or len(rollouts) > cfg.learner.minibatch_size):
        raise ValueError(
            "Experience.old_logprobs is None, but this config needs them before its update (more than one epoch "
            "or minibatch, a critic, KL in the rewards, a colocated reference or a rollout correction beyond "
            "decoupled token IS): call prepare() first"
        )
    vllm_lp = pad_rows([r.logprobs for r in rollouts], width).to(device)
    if behaviour_ratio(cfg):
        old = vllm_lp  # asynchronous, the ratio against the behaviour policy
    else:
        old = torch.zeros_like(mask) if fill_old else pad_rows(exp.old_logprobs, width).to(device)
    rows = lambda x: None if x is None else pad_rows(x, width).to(device)  # noqa: E731
    return StepBatch(mask, old, vllm_lp, rows(exp.ref_logprobs), rows(exp.values),
                     torch.tensor(exp.scores, dtype=torch.float32, device=device),
                     torch.tensor(exp.group_ids, device=device), fill_old)


def token_budget_batches(lengths: Sequence[tuple[int, int]], idx: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Cut `idx` (in order) into micro-batches whose padded size rows × (P + T) fits `budget`
    (a single longer sequence still gets its own micro-batch)."""
    current: list[int] = []
    width_p = width_r = 0
    for i in idx:
        p, r = lengths[i]
        wp, wr = max(width_p, p), max(width_r, r)
        if current and (len(current) + 1) * (wp + wr) > budget:
            yield current
            current, wp, wr = [], p, r
        current.append(i)
        width_p, width_r = wp, wr
    if current:
        yield current


def scatter_rows(out: list[list[float]], idx: Sequence[int], rows: torch.Tensor, rollouts: Sequence[Rollout]) -> None:
    """Write each row of `rows` (its response's length of it) into `out` at index `idx[j]`."""
    if not idx:
        return
    for row, i in zip(rows.float().cpu(), idx, strict=True):
        out[i] = row[: len(rollouts[i].response_ids)].tolist()

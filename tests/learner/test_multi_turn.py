"""The learner on multi-turn episodes: observation tokens get no loss, no KL, no entropy and no
value loss (their gradients are exactly zero), and per-turn rewards land on each turn's end."""

from __future__ import annotations

import pytest
import torch

from rlfleet.common.records import Episode, Rollout
from rlfleet.learner import learner as learner_module
from rlfleet.learner.learner import Learner
from rlfleet.learner.step_data import step_rewards
from tests.learner.test_learner import experience, make_config

pytestmark = pytest.mark.unit

MASK = [1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
"""Three turns: 3 generated, 4 observation, 2 generated, 2 observation, 3 generated."""
OBSERVED = torch.tensor(MASK) == 0


def episodes(seed: int = 0) -> list[Rollout]:
    """6 episodes (3 prompts × 2) of one shape, so any row order shows the same columns."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(6):
        prompt = torch.randint(4, 100, (5,), generator=g).tolist()
        response = torch.randint(4, 100, (len(MASK),), generator=g).tolist()
        logprobs = [-4.6 if m else 0.0 for m in MASK]
        ends = [2, 8, 13]
        episode = Episode(float(i % 2), ends, [0.0, 0.5 * (i % 2), 0.5 * (i % 2)], [0, 0, 0], bool(i % 2))
        out.append(Rollout(i // 2, prompt, response, logprobs, "stop", 0, list(MASK), episode))
    return out


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_observation_tokens_get_no_loss_kl_entropy_or_value_gradient(tiny_model_dir, monkeypatch, estimator):
    """The gradient reaching each token's log-prob, entropy and value is exactly 0 on observation
    tokens and not 0 on generated ones (GAE: critic, KL in the rewards; GRPO: k3 KL in the loss;
    both with an entropy bonus)."""
    captured: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "values": []}
    logprobs_fn, values_fn = learner_module.response_logprobs, learner_module.response_values

    def keep(name: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None and tensor.requires_grad:
            tensor.retain_grad()
            captured[name].append(tensor)

    def logprobs_and_entropy(*args, **kwargs):
        logp, entropy = logprobs_fn(*args, **kwargs)
        keep("logprobs", logp)
        keep("entropy", entropy)
        return logp, entropy

    def values(*args, **kwargs):
        out = values_fn(*args, **kwargs)
        keep("values", out)
        return out

    monkeypatch.setattr(learner_module, "response_logprobs", logprobs_and_entropy)
    monkeypatch.setattr(learner_module, "response_values", values)
    learner = Learner(make_config(estimator, minibatch_size=6, ppo_epochs=1), str(tiny_model_dir))
    learner.train_step(experience(learner, episodes()))
    kinds = ["logprobs", "entropy"] + (["values"] if estimator == "gae" else [])
    for kind in kinds:
        assert captured[kind], kind
        for tensor in captured[kind]:
            grad = tensor.grad[:, : len(MASK)]
            assert torch.all(grad[:, OBSERVED] == 0), kind
            assert torch.all(grad[:, ~OBSERVED].abs().sum(0) > 0), kind


def test_turn_rewards_land_on_each_turns_last_generated_token():
    cfg = make_config("reinforce_pp")
    cfg = cfg.model_copy(update={"environment": cfg.environment.model_copy(update={"reward_at": "turn"})})
    rollouts = episodes()
    mask = torch.tensor([MASK] * 6, dtype=torch.float32)
    scores = torch.tensor([r.episode.reward for r in rollouts])
    kl = torch.full_like(mask, 0.1)
    placed = step_rewards(cfg, rollouts, scores, kl, mask, beta=1.0)
    for row, r in enumerate(rollouts):
        want = -0.1 * mask[row]
        for end, reward in zip(r.episode.turn_ends, r.episode.turn_rewards, strict=True):
            want[end] += reward
        torch.testing.assert_close(placed[row], want)
    last = step_rewards(make_config("reinforce_pp"), rollouts, scores, kl, mask, beta=1.0)
    assert last[1, 13] == pytest.approx(1.0 - 0.1) and last[1, 8] == pytest.approx(-0.1)

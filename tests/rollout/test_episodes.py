"""Multi-turn episodes through a real vLLM worker and real environment hosts (Ray actors), with
the BPE tokenizer: token-exact trajectories, the engine's log-probs equal to the learner's,
bad tool calls as error observations, and a SIGKILLed host's episodes re-run from their start."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from rlfleet.common.records import Rollout, SamplingSpec

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ["add", "raises", "dies", "sleeps", "hogs"]
MAX_LEN = 1536
"""The test tools' schemas take ~800 BPE tokens of the prompt."""


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory) -> Path:
    from rlfleet.common.config import TinyModelConfig
    from rlfleet.common.tiny_models import build_tiny_causal_lm

    shape = TinyModelConfig(tokenizer="bpe", max_position_embeddings=MAX_LEN)
    return build_tiny_causal_lm(tmp_path_factory.mktemp("bpe-policy"), seed=0, shape=shape)


@pytest.fixture(scope="module")
def agent(ray_cluster, bpe_model_dir):
    """Two environment hosts of `EpisodeProbe` (the test tools, 2 s and 200 MB limits) and one
    vLLM worker that plays episodes on them."""
    from rlfleet.common.config import RoleResources, RunConfig
    from rlfleet.deploy.actors.assembly import rollout_worker_factory, start_environment_hosts

    # The hosts import the test tools from the repository root. Its `common/`, `deploy/`… must not
    # stay importable as top-level packages after this module (tests/test_package.py checks it).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(ROOT), prepend=os.pathsep)
        cfg = RunConfig.model_validate({
            "data": {"task": "guess_number"},
            "rollout": {"max_model_len": MAX_LEN},
            "environment": {"path": "tests.services.tool_fixtures:EpisodeProbe", "hosts": 2, "max_turns": 10,
                            "max_episode_tokens": 640, "tool_timeout_s": 2.0, "tool_memory_mb": 200,
                            "tools": [f"tests.services.tool_fixtures:{t}" for t in TOOLS]},
        })
        hosts = start_environment_hosts(cfg)
        worker = rollout_worker_factory(str(bpe_model_dir), cfg.rollout, RoleResources(num_cpus=1), 0, None,
                                        cfg.environment, hosts)()
        ray_cluster.get(worker.policy_version.remote())
        yield worker, hosts
        for handle in (worker, *hosts):
            ray_cluster.kill(handle)


@pytest.fixture(scope="module")
def tokenizer(bpe_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_model_dir)


def segments(r: Rollout) -> list[tuple[int, list[int]]]:
    """The response cut into runs of equal loss mask: [(mask value, ids), …]."""
    out: list[tuple[int, list[int]]] = []
    for tok, m in zip(r.response_ids, r.loss_mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(tok)
        else:
            out.append((m, [tok]))
    return out


def turn_text(tokenizer, ids: list[int]) -> str:
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def schemas():
    from rlfleet.services.sandbox import import_path
    from rlfleet.services.tools import tool_schema

    return [tool_schema(import_path(f"tests.services.tool_fixtures:{t}")) for t in TOOLS]


def check_guess_episode(r: Rollout, tokenizer, secret: int) -> None:
    """The record against an independent rendering: the prompt is the template's text of the
    opening message, tokenized; each observation is exactly the tokenizer's ids of the text
    the template puts between two assistant turns; the feedback is what a fresh game says."""
    from rlfleet.services.environments import GuessNumber

    opening = [{"role": "user", "content": "guess a number between 1 and 20"}]
    prompt_text = tokenizer.apply_chat_template(opening, tools=schemas(), tokenize=False, add_generation_prompt=True)
    assert r.prompt_ids == tokenizer.encode(prompt_text, add_special_tokens=False)
    game = GuessNumber(high=20, max_guesses=3)
    game.reset({"secret": secret})
    parts = segments(r)
    turns = [ids for m, ids in parts if m == 1]
    observations = [ids for m, ids in parts if m == 0]
    assert parts[0][0] == 1 and len(turns) == r.episode.turns and len(observations) == len(turns) - 1
    for i, ids in enumerate(turns):
        step = game.step(turn_text(tokenizer, ids))
        if i < len(observations):
            text = f"\n<|user|>{step.observation[0]['content']}<|end|>\n<|assistant|>"
            assert observations[i] == tokenizer.encode(text, add_special_tokens=False), (i, text)
        else:
            assert step.done or r.episode.turns == 3 or r.finish_reason == "length"
    assert all(lp == 0.0 for lp, m in zip(r.logprobs, r.loss_mask, strict=True) if m == 0)
    ends = [i for i, m in enumerate(r.loss_mask) if m == 1 and (i + 1 == len(r.loss_mask) or r.loss_mask[i + 1] == 0)]
    assert ends == r.episode.turn_ends


def test_multi_turn_trajectories_are_token_exact_and_the_learner_agrees_with_the_engine(
        agent, tokenizer, bpe_model_dir):
    from transformers import AutoModelForCausalLM

    from rlfleet.common.collate import pack
    from rlfleet.learner.models import response_logprobs

    worker, _ = agent
    import ray

    secrets = [3, 11, 17]
    batch = ray.get(worker.run_episodes.remote([{"mode": "guess", "secret": s} for s in secrets],
                                               SamplingSpec(n=2, max_tokens=12, seed=5)))
    rollouts = batch.rollouts
    assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
    assert sum(r.episode.turns > 1 for r in rollouts) >= 4  # multi-turn, not silently single-turn
    for r in rollouts:
        check_guess_episode(r, tokenizer, secrets[r.prompt_index])
        assert r.episode.turn_versions == [0] * r.episode.turns and r.policy_version == 0
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir, dtype=torch.float32).eval()
    packed = pack([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], tokenizer.pad_token_id)
    with torch.no_grad():
        learner_lp, _ = response_logprobs(model, packed, 1.0)
    for row, r in enumerate(rollouts):
        generated = torch.tensor(r.loss_mask, dtype=torch.bool)
        ours = learner_lp[row, : len(r.response_ids)][generated]
        engine = torch.tensor(r.logprobs)[generated]
        assert (ours - engine).abs().max().item() < 1e-3


def test_every_bad_tool_call_is_an_error_observation_and_the_episode_goes_on(agent, tokenizer):
    import ray

    worker, _ = agent
    call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'.format
    calls = [call("add", '{"a": 1, "b": 2}'), "<tool_call>{oops", call("nope", "{}"), call("add", '{"a": 1}'),
             call("raises", "{}"), call("dies", "{}"), call("sleeps", '{"seconds": 600}'),
             call("hogs", '{"megabytes": 2000}'), call("add", '{"a": 3, "b": 4}')]
    batch = ray.get(worker.run_episodes.remote([{"mode": "calls", "calls": calls}], SamplingSpec(n=1, max_tokens=3)))
    (r,) = batch.rollouts
    observations = [turn_text(tokenizer, ids) for m, ids in segments(r) if m == 0]
    assert r.episode.turns == len(calls) and len(observations) == len(calls) - 1
    assert r.episode.tool_calls == len(calls) and r.episode.tool_errors == 7 and r.episode.success
    expected = ["3", "unparseable", "unknown_tool", "bad_arguments", "error: ", "crashed", "timeout"]
    for obs, what in zip(observations, expected, strict=False):
        assert obs.startswith("\n<|tool|>") and what in obs, (obs, what)
    assert "MemoryError" in observations[7] or "crashed" in observations[7]
    assert ray.get(worker.policy_version.remote()) == 0  # the worker survived all of it


def test_a_sigkilled_environment_host_has_its_episodes_rerun_from_their_start(agent, tokenizer, tmp_path):
    import ray

    worker, hosts = agent
    pids = ray.get([h.health.remote() for h in hosts])
    examples = [{"mode": "guess", "secret": s} for s in (2, 9, 14, 19)]
    examples.append({"mode": "dies", "secret": 5, "marker": str(tmp_path / "died")})
    batch = ray.get(worker.run_episodes.remote(examples, SamplingSpec(n=2, max_tokens=12, seed=9)), timeout=300)
    rollouts = batch.rollouts
    assert (tmp_path / "died").exists()
    assert Counter(r.prompt_index for r in rollouts) == {i: 2 for i in range(5)}  # none lost or duplicated
    after = ray.get([h.health.remote() for h in hosts])
    died = [i for i in range(2) if after[i] != pids[i]]
    assert len(died) == 1  # one host was killed, Ray restarted it
    restarts = {host: [r.episode.restarts for slot, r in enumerate(rollouts) if slot % 2 == host] for host in (0, 1)}
    assert set(restarts[1 - died[0]]) == {0}  # slot i·n + k ran on host slot % 2
    assert set(restarts[died[0]]) <= {0, 1} and 1 in restarts[died[0]]  # (0: it had ended before the kill)
    for r in rollouts:  # a re-run episode is whole: its own prompt, turns and observations
        check_guess_episode(r, tokenizer, examples[r.prompt_index]["secret"])
    assert ray.get([h.open_episodes.remote() for h in hosts]) == [0, 0]  # every episode closed

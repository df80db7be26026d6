"""The multi-turn turn loop of a rollout worker: token-exact episodes against environment hosts.

For a request of P examples × n samples, every episode is opened on an environment host
(`services/environment_host.py`, a Ray actor) and then, turn by turn, all running episodes
generate together in one engine call, continuing from their own ids (prompt + every earlier
turn + every observation), and the hosts answer the turns. An episode's record holds

    response_ids = turn 1's generated ids, observation 1's ids, turn 2's generated ids, …
    loss_mask    = 1 on generated ids, 0 on observation ids
    logprobs     = the engine's log-probs of generated ids, 0 on observation ids

Each observation is rendered (`common/chat.py`) and tokenized once, when it is appended.
An episode ends when the environment says done, at `max_turns`, or when the episode's token
budget (`max_episode_tokens`, or the engine's `max_model_len`) has no room for the next
observation or turn (its record's finish reason is then 'length'). A turn cut by the per-turn
limit (`rollout.max_response_tokens`) is still answered by the environment; the record's finish
reason is that of its last turn.

A host that dies (or passes its deadline) loses the state of the episodes it held: those
that were still running are re-run from their start on the restarted host; finished ones are
kept. Every episode ends exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from rlfleet.common.chat import observation_ids, prompt_ids, turn_closing
from rlfleet.common.config_env import EnvironmentConfig
from rlfleet.common.records import Episode, Rollout, SamplingSpec

logger = logging.getLogger(__name__)

Turn = tuple[list[int], list[float], str]
"""One engine continuation: generated ids, their log-probs, finish reason ('stop' | 'length')."""
Engine = Callable[[list[list[int]], list[int], list[int | None]], list[Turn]]
"""(prefix ids per episode, token limit per episode, seed per episode) → one Turn each."""


class EpisodeError(RuntimeError):
    """Episodes could not be completed (a host kept dying, or did not come back)."""


@dataclass
class _Run:
    slot: int
    """Index in the request's P × n records (prompt i, sample k → i·n + k)."""
    example: Mapping[str, Any]
    host: int
    key: str = ""
    prompt: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turn_start: int = 0
    turn_ends: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    finish: str = "stop"
    success: bool = False
    tool_calls: int = 0
    tool_errors: int = 0
    restarts: int = 0
    done: bool = False

    def restart(self) -> None:
        self.ids, self.logprobs, self.mask, self.turn_ends, self.rewards = [], [], [], [], []
        self.finish, self.success, self.tool_calls, self.tool_errors, self.done = "stop", False, 0, 0, False
        self.restarts += 1


class EpisodeRunner:
    """Plays episodes for one rollout worker (`worker_id` keys its episodes on the hosts)."""

    def __init__(self, hosts: Sequence[Any], config: EnvironmentConfig, tokenizer, worker_id: str):
        self._hosts, self._cfg, self._tok, self._id = list(hosts), config, tokenizer, worker_id
        self._closing = turn_closing(tokenizer)
        self._tools = self._call(0, "tools")
        self._count = 0
        self._max_len = 0

    def run(self, examples: Sequence[Mapping[str, Any]], spec: SamplingSpec, engine: Engine,
            version: int, max_model_len: int) -> list[Rollout]:
        """`spec.n` episodes per example, grouped by example in request order."""
        runs = [_Run(i * spec.n + k, ex, (i * spec.n + k) % len(self._hosts))
                for i, ex in enumerate(examples) for k in range(spec.n)]
        turn = 0
        self._max_len = max_model_len
        self._open(runs)
        while True:
            live = [r for r in runs if not r.done]
            if not live:
                break
            limits = [min(spec.max_tokens, self._room(r)) for r in live]
            for r, limit in zip(live, limits, strict=True):
                if limit < 1:  # no room left in the engine for another turn
                    r.done, r.finish = True, "length"
            live = [r for r, limit in zip(live, limits, strict=True) if limit >= 1]
            limits = [limit for limit in limits if limit >= 1]
            if not live:
                break
            seeds = [None if spec.seed is None else spec.seed + r.slot + 7_919 * (turn + 101 * r.restarts)
                     for r in live]
            for run, (ids, logprobs, finish) in zip(live, engine([r.prompt + r.ids for r in live], limits, seeds),
                                                     strict=True):
                run.turn_start = len(run.ids)
                run.ids += ids
                run.logprobs += logprobs
                run.mask += [1] * len(ids)
                run.turn_ends.append(len(run.ids) - 1)
                run.finish = finish
            self._answer(live)
            turn += 1
        self._close(runs)
        return [self._record(r, version, spec.n) for r in runs]

    # ------------------------------------------------------------------ the hosts
    def _open(self, runs: list[_Run]) -> None:
        """Open `runs` on their hosts (re-opening those whose host died meanwhile)."""
        pending = list(runs)
        while pending:
            for r in pending:
                self._count += 1
                r.key = f"{self._id}/{self._count}"
            failed = []
            for host, group in self._by_host(pending).items():
                try:
                    opened = self._call(host, "reset", [r.key for r in group], [dict(r.example) for r in group])
                except _HostLost:
                    failed += self._lost(host, group)
                    continue
                for r, messages in zip(group, opened, strict=True):
                    r.prompt = prompt_ids(self._tok, messages, self._tools)
            pending = failed

    def _answer(self, live: list[_Run]) -> None:
        """Step every live episode's environment with its latest turn; append observations."""
        reopen = []
        for host, group in self._by_host(live).items():
            texts = [self._text(r.ids[r.turn_start:]) for r in group]
            try:
                steps = self._call(host, "step", [r.key for r in group], texts)
            except _HostLost:
                reopen += self._lost(host, group)
                continue
            for r, step in zip(group, steps, strict=True):
                self._apply(r, step)
        if reopen:
            self._open(reopen)

    def _text(self, ids: list[int]) -> str:
        """A turn's text as the environment reads it: special tokens kept (tool-call tags may
        be special tokens), the closing EOS left out."""
        if ids and ids[-1] == self._tok.eos_token_id:
            ids = ids[:-1]
        return self._tok.decode(ids, skip_special_tokens=False)

    def _apply(self, r: _Run, step: Any) -> None:
        r.rewards.append(float(step.reward))
        info = step.info or {}
        if "tool_error" in info:
            r.tool_calls += 1
            r.tool_errors += info["tool_error"] is not None
        r.success = bool(info.get("success", step.reward > 0)) if step.done else r.success
        if step.done or not step.observation or len(r.turn_ends) >= self._cfg.max_turns:
            r.done = True
            return
        obs = observation_ids(self._tok, step.observation, self._closing)
        if self._room(r) - len(obs) < 1:  # no room for the observation and a turn after it
            r.done, r.finish = True, "length"
            return
        r.ids += obs
        r.logprobs += [0.0] * len(obs)
        r.mask += [0] * len(obs)

    def _room(self, r: _Run) -> int:
        """Tokens an episode may still add (the episode budget, and the engine's length)."""
        return min(self._cfg.max_episode_tokens - len(r.ids), self._max_len - len(r.prompt) - len(r.ids))

    def _close(self, runs: list[_Run]) -> None:
        for host, group in self._by_host(runs).items():
            try:
                self._call(host, "close", [r.key for r in group])
            except _HostLost:
                pass  # a restarted host holds none of them anyway

    def _lost(self, host: int, group: list[_Run]) -> list[_Run]:
        """The host died: wait until Ray has restarted it; its episodes start again."""
        for r in group:
            if r.restarts >= self._cfg.max_restarts:
                raise EpisodeError(f"episode {r.slot} lost its environment host {r.restarts + 1} times "
                                   f"(environment.max_restarts={self._cfg.max_restarts})")
            r.restart()
        logger.warning("environment host %d died; re-running its %d running episodes from their start", host,
                       len(group))
        self._wait_back(host)
        return group

    def _wait_back(self, host: int) -> None:
        deadline = time.monotonic() + self._cfg.call_timeout_s
        while True:
            try:
                ray.get(self._hosts[host].health.remote(), timeout=self._cfg.call_timeout_s)
                return
            except (ActorUnavailableError, GetTimeoutError, RayActorError) as err:
                if time.monotonic() > deadline:
                    raise EpisodeError(f"environment host {host} did not come back within "
                                       f"{self._cfg.call_timeout_s:g} s (environment.call_timeout_s)") from err
                time.sleep(0.5)

    def _call(self, host: int, method: str, *args: Any) -> Any:
        """One host call with the run's deadline; a dead or stuck host raises _HostLost (a stuck
        one is killed first, so that Ray restarts it)."""
        handle = self._hosts[host]
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=self._cfg.call_timeout_s)
        except GetTimeoutError as err:
            logger.warning("environment host %d: %s passed its %.0f s deadline; restarting it", host, method,
                           self._cfg.call_timeout_s)
            ray.kill(handle, no_restart=False)
            raise _HostLost(host) from err
        except RayActorError as err:
            raise _HostLost(host) from err

    def _by_host(self, runs: list[_Run]) -> dict[int, list[_Run]]:
        out: dict[int, list[_Run]] = {}
        for r in runs:
            out.setdefault(r.host, []).append(r)
        return out

    # ------------------------------------------------------------------ the record
    def _record(self, r: _Run, version: int, n: int) -> Rollout:
        episode = Episode(
            reward=sum(r.rewards), turn_ends=list(r.turn_ends), turn_rewards=list(r.rewards),
            turn_versions=[version] * len(r.turn_ends), success=r.success, tool_calls=r.tool_calls,
            tool_errors=r.tool_errors, restarts=r.restarts,
        )
        return Rollout(prompt_index=r.slot // n, prompt_ids=r.prompt, response_ids=r.ids, logprobs=r.logprobs,
                       finish_reason="length" if r.finish == "length" else "stop", policy_version=version,
                       loss_mask=r.mask, episode=episode)


class _HostLost(Exception):
    def __init__(self, host: int):
        super().__init__(f"environment host {host} died or passed its deadline")
        self.host = host

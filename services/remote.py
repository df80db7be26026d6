"""A remote HTTP scorer client.

Protocol (what `rlfleet.services.reward_server` serves):
    POST {url}      {"prompts": [str], "responses": [str], "extras": [object]}
                    → 200 {"scores": [float | null]}
    GET  {origin}/health → 200 when the scorer is ready
An optional bearer token is read from the environment variable `reward.remote.token_env`.
Timeouts, connection errors and 5xx answers are retried with exponential backoff (honouring
Retry-After); a 4xx answer is the caller's fault and is never retried.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

logger = logging.getLogger(__name__)


class RemoteScorerError(RuntimeError):
    """The remote scorer refused the request (4xx) or failed past the retry budget."""


class RemoteScorer:
    """Client of a remote scorer; checks at construction that the service answers."""

    def __init__(
        self,
        url: str,
        token_env: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.2,
        field: str = "reward.remote",
    ):
        self.url = url
        self._field = field
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        headers = {}
        if token_env is not None:
            token = os.environ.get(token_env)
            if not token:
                raise ValueError(f"{field}.token_env={token_env!r}: the environment variable is not set")
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self.retries = 0
        """Retried attempts so far (5xx answers, timeouts, refused connections)."""
        self._check_health()

    def _check_health(self) -> None:
        parts = urlsplit(self.url)
        health = urlunsplit((parts.scheme, parts.netloc, "/health", "", ""))
        try:
            response = self._client.get(health)
        except httpx.HTTPError as err:
            raise ValueError(f"{self._field}.url={self.url!r}: the scorer does not answer at {health} ({err})") from None
        if response.status_code >= 500 or response.status_code == 404:
            raise ValueError(f"{self._field}.url={self.url!r}: {health} answered {response.status_code}")

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], extras: Sequence[Mapping[str, Any]]
    ) -> list[float | None]:
        """One score (or None) per response."""
        body = {"prompts": list(prompts), "responses": list(responses), "extras": [dict(e) for e in extras]}
        for attempt in range(self._max_retries + 1):
            wait = self._backoff_s * 2**attempt
            try:
                response = self._client.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 400:
                    return self._parse(response, len(responses))
                if response.status_code < 500:
                    raise RemoteScorerError(f"{self.url} refused the request: {response.status_code} {response.text[:200]}")
                problem = f"{response.status_code} {response.text[:200]}"
                wait = max(wait, float(response.headers.get("retry-after", 0)))
            if attempt == self._max_retries:
                break
            self.retries += 1
            logger.warning("remote scorer: %s; retry %d in %.1fs", problem, attempt + 1, wait)
            time.sleep(wait)
        raise RemoteScorerError(
            f"{self.url} failed after {self._max_retries + 1} attempts ({self._field}.max_retries="
            f"{self._max_retries}): {problem}"
        )

    def _parse(self, response: httpx.Response, expected: int) -> list[float | None]:
        try:
            scores = response.json()["scores"]
        except (ValueError, KeyError, TypeError):
            raise RemoteScorerError(f"{self.url} answered without a 'scores' list: {response.text[:200]}") from None
        if not isinstance(scores, list) or len(scores) != expected:
            raise RemoteScorerError(f"{self.url} returned {len(scores) if isinstance(scores, list) else scores!r} "
                                    f"scores for {expected} responses")
        return scores

    def close(self) -> None:
        self._client.close()

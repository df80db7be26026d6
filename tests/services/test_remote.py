"""The remote scorer against the shipped FastAPI reward server on 127.0.0.1."""

from __future__ import annotations

import hmac
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from rlfleet.common.tiny_models import build_char_tokenizer, build_tiny_reward_model
from rlfleet.services import reward_server
from rlfleet.services.remote import RemoteScorer, RemoteScorerError
from rlfleet.services.reward_model import RewardModelScorer
from tests.ports import free_port

pytestmark = pytest.mark.unit
TOKEN_ENV = "RLFLEET_TEST_REWARD_TOKEN"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_reward_model(tmp_path_factory.mktemp("rm"), seed=4)
    port = free_port()
    env = dict(os.environ, **{TOKEN_ENV: "s3cret"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlfleet.services.reward_server", "--model", str(model),
         "--port", str(port), "--token-env", TOKEN_ENV, "--max-inflight", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(proc.stderr.read().decode()[-2000:])
    yield base, model
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    return TOKEN_ENV


def test_round_trip_equals_the_local_model(server, token):
    base, model = server
    client = RemoteScorer(f"{base}/score", token_env=token)
    prompts, responses = ["1+1=", "12+30=", "x"], ["2", "42 is it", ""]
    got = client.score(prompts, responses, [{}] * 3)
    tok = build_char_tokenizer()
    local = RewardModelScorer(str(model)).score([tok.encode(p + r, add_special_tokens=False)
                                                for p, r in zip(prompts, responses, strict=True)])
    assert got == pytest.approx(local, abs=1e-5)
    assert client.retries == 0


def test_missing_or_wrong_token_is_refused_with_401(server, monkeypatch):
    base, _ = server
    no_token = RemoteScorer(f"{base}/score")
    with pytest.raises(RemoteScorerError, match="refused the request: 401"):
        no_token.score(["a"], ["b"], [{}])
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    wrong = RemoteScorer(f"{base}/score", token_env=TOKEN_ENV)
    with pytest.raises(RemoteScorerError, match="refused the request: 401"):
        wrong.score(["a"], ["b"], [{}])
    assert no_token.retries == wrong.retries == 0


def test_the_token_is_compared_in_constant_time(server, monkeypatch):
    """The server compares bearer tokens with `hmac.compare_digest`, never `!=`."""
    from fastapi.testclient import TestClient

    compared, compare = [], hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(reward_server.hmac, "compare_digest", recording)
    app = reward_server.create_app(str(server[1]), token="s3cret")
    with TestClient(app) as client:
        body = {"prompts": ["a"], "responses": ["b"]}
        assert client.post("/score", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/score", json=body, headers={"Authorization": "Bearer s3cre"}).status_code == 401
    assert len(compared) == 2 and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in compared)
    assert reward_server.bearer_matches("Bearer s3cret", "s3cret")
    for wrong in (None, "", "s3cret", "Bearer s3cre", "Bearer s3cretx", "bearer s3cret", "Bearer é"):
        assert not reward_server.bearer_matches(wrong, "s3cret"), wrong


def test_bad_request_400_is_not_retried(server, token):
    base, _ = server
    client = RemoteScorer(f"{base}/score", token_env=token, max_retries=3)
    with pytest.raises(RemoteScorerError, match="refused the request: 400"):
        client.score(["a", "b"], ["only one response"], [{}, {}])
    assert client.retries == 0


def test_busy_server_503_is_retried_until_it_answers(server, token):
    base, _ = server
    busy = RemoteScorer(f"{base}/score", token_env=token)
    big = ["7" * 200] * 1500  # keeps the single scoring slot busy for a while
    hold = threading.Thread(target=busy.score, args=(big, big, [{}] * len(big)))
    hold.start()
    time.sleep(0.3)
    client = RemoteScorer(f"{base}/score", token_env=token, max_retries=8, backoff_s=0.1)
    assert len(client.score(["1+1="], ["2"], [{}])) == 1
    hold.join()
    assert client.retries >= 1  # it met 503 "busy" at least once, and retried


def test_unanswering_url_fails_at_startup_naming_the_field():
    port = free_port()
    with pytest.raises(ValueError, match=rf"reward.remote.url='http://127.0.0.1:{port}/score': the scorer does not answer"):
        RemoteScorer(f"http://127.0.0.1:{port}/score", timeout_s=2)
    with pytest.raises(ValueError, match=r"reward.remote.token_env='RLFLEET_UNSET_VAR': the environment variable is not set"):
        RemoteScorer(f"http://127.0.0.1:{port}/score", token_env="RLFLEET_UNSET_VAR")

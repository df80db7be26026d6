"""A small reward server (FastAPI) serving a sequence-classification reward model over HTTP.

    python -m rlfleet.services.reward_server --model PATH [--port 8000] [--token-env VAR]

Speaks the protocol of `rlfleet.services.remote`. Answers 401 without the right bearer token
(when one is configured), 400 for a malformed request, and 503 with Retry-After when
`--max-inflight` requests are already being scored (load shedding: the client retries).
"""

from __future__ import annotations

import argparse
import hmac
import os
import threading
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, model_validator
from transformers import AutoTokenizer

from rlfleet.services.reward_model import RewardModelScorer


class ScoreRequest(BaseModel):
    prompts: list[str]
    responses: list[str]
    extras: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> ScoreRequest:
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses")
        return self


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries `token`, compared in constant time (a plain
    `!=` returns at the first differing byte, which leaks the token's prefix to a timer)."""
    given = (authorization or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, f"Bearer {token}".encode("utf-8", "surrogateescape"))


def create_app(model_path: str, token: str | None = None, max_inflight: int = 1, micro_batch_size: int = 16) -> FastAPI:
    """The app; the model is loaded before the app is returned."""
    scorer = RewardModelScorer(model_path, micro_batch_size=micro_batch_size, field="--model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    slots = threading.BoundedSemaphore(max_inflight)
    app = FastAPI(title="rlfleet reward server")
    app.state.shed = 0

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc.errors()[:3])})

    @app.get("/health")
    def health() -> dict[str, Any]:
        info = scorer.info()
        return {"status": "ok", "parameters": info.parameters, "device": info.device, "dtype": info.dtype}

    @app.post("/score")
    def score(request: ScoreRequest, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        if token is not None and not bearer_matches(authorization, token):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")
        if not slots.acquire(blocking=False):
            app.state.shed += 1
            raise HTTPException(status_code=503, detail="busy", headers={"Retry-After": "1"})
        try:
            seqs = [
                tokenizer.encode(p, add_special_tokens=False) + tokenizer.encode(r, add_special_tokens=False)
                for p, r in zip(request.prompts, request.responses, strict=True)
            ]
            return {"scores": scorer.score(seqs) if seqs else []}
        finally:
            slots.release()

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="reward model folder (1-label sequence classifier)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    parser.add_argument("--max-inflight", type=int, default=1, help="concurrent requests before 503")
    args = parser.parse_args()
    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        parser.error(f"--token-env {args.token_env}: the environment variable is not set")
    app = create_app(args.model, token=token, max_inflight=args.max_inflight)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

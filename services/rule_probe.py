"""One call of a reward rule in a fresh interpreter: `python -m rlfleet.services.rule_probe`
reads {"path", "prompt", "response", "extra", "timeout_s"} as JSON on stdin, calls the
function under the timeout (SIGALRM) and writes {"status", "value" | "detail"} as JSON on
stdout; the caller turns it into a `RuleOutcome` (`probe_rule`).

A fresh interpreter, not a multiprocessing child: the driver's main module (a user's script)
is never re-imported, and nothing is unpickled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

START_S = 120.0
"""How long the interpreter may take to start and import the rule's module."""


def probe_rule(path: str, prompt: str, response: str, extra: dict[str, Any], timeout_s: float,
               style: str = "rlfleet"):
    """The `RuleOutcome` of one call of `path` in its `style` (a batch style: a batch of one),
    made in a fresh interpreter."""
    from rlfleet.services.rules import RuleOutcome, judge

    request = json.dumps({"path": path, "prompt": prompt, "response": response, "extra": extra,
                          "timeout_s": timeout_s, "style": style}, default=str)
    try:
        done = subprocess.run([sys.executable, "-m", "rlfleet.services.rule_probe"], input=request, text=True,
                              capture_output=True, timeout=START_S + timeout_s)
    except subprocess.TimeoutExpired:
        return RuleOutcome(None, "timeout")
    if done.returncode != 0 or not done.stdout.strip():
        return RuleOutcome(None, "crashed", f"exit code {done.returncode}: {done.stderr.strip()[-300:]}")
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    if reply["status"] == "value":
        return judge("ok", reply["value"])
    if reply["status"] == "other":  # not JSON-representable: a number it is not
        return RuleOutcome(None, "not_a_number", reply["detail"])
    return judge(reply["status"], reply.get("detail"))


def _timeout(*_):
    raise TimeoutError


def main() -> None:
    request = json.loads(sys.stdin.read())
    from rlfleet.services.reward_styles import BATCH_STYLES, Scored, call
    from rlfleet.services.sandbox import import_path

    path, style = request["path"], request.get("style", "rlfleet")
    prompt, response, extra = request["prompt"], request["response"], request["extra"]
    fn = import_path(path)
    signal.signal(signal.SIGALRM, _timeout)
    signal.setitimer(signal.ITIMER_REAL, request["timeout_s"])
    try:
        if style == "rlfleet":
            value = fn(prompt, response, extra)
        elif style in BATCH_STYLES:
            [value] = call(path, style, [prompt], [response], [extra], [[]])
        else:
            value = call(path, style, prompt, response, extra)
        if isinstance(value, Scored):
            value = value.value
        reply: dict[str, Any] = {"status": "value", "value": value}
    except TimeoutError:
        reply = {"status": "timeout"}
    except BaseException as err:  # noqa: BLE001 - the call's failure is the answer
        reply = {"status": "error", "detail": f"{type(err).__name__}: {err}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        text = json.dumps(reply, allow_nan=True)
    except (TypeError, ValueError):
        text = json.dumps({"status": "other", "detail": f"returned {type(value).__name__} {repr(value)[:120]}"})
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()

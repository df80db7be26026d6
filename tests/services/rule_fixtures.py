"""Rule functions for the tests, imported by name (`tests.services.rule_fixtures:NAME`)."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path


def by_length(prompt, response, extra):
    return float(len(response))


def raises(prompt, response, extra):
    raise RuntimeError("broken reward code")


def returns_nan(prompt, response, extra):
    return float("nan")


def returns_nan_on_x(prompt, response, extra):
    return float("nan") if "x" in response else 0.0


def hangs_on_x(prompt, response, extra):
    if "x" in response:
        time.sleep(3600)
    return 1.0


def wrong_signature(response):
    return 1.0


KILL_MARKER = Path(tempfile.gettempdir()) / "rlfleet-test-kill-reward-service"


def kills_its_service_once(prompt, response, extra):
    """Fault injection, armed by creating KILL_MARKER: the first call after that SIGKILLs the
    reward actor (the parent of the pool process this rule runs in); otherwise 1.0 per 'a'."""
    try:
        os.rename(KILL_MARKER, f"{KILL_MARKER}.fired")  # atomic: exactly one call fires
    except FileNotFoundError:
        return response.count("a") / max(len(response), 1)
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)
    return None


def exits_on_x(prompt, response, extra):
    """A rule that takes its process down (as a segfault or the OOM killer would)."""
    if "x" in response:
        os._exit(3)
    return 1.0


def allocates_without_bound(*args):
    """Keeps allocating until something stops it."""
    hoard = []
    while True:
        hoard.append(bytearray(64 * 2**20))


HOLD_MARKER = Path(tempfile.gettempdir()) / "rlfleet-test-hold-scoring"
HELD_MARKER = Path(tempfile.gettempdir()) / "rlfleet-test-held-scoring"
"""Touched by a call that found HOLD_MARKER: a scoring call is in flight, held."""


def math_answer_while_not_held(prompt, response, extra):
    """`math_answer`, but each call first waits (up to 10 min) while HOLD_MARKER exists: a test
    holds a job at its first scoring until it has done what it must do while the job runs. The
    dry call before the run (its placeholder response "0", `deploy/app/preflight.py`) is not held."""
    from rlfleet.services.rules import math_answer

    if response == "0":
        return math_answer(prompt, response, extra)
    deadline = time.monotonic() + 600
    if HOLD_MARKER.exists():
        HELD_MARKER.touch()
    while HOLD_MARKER.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return math_answer(prompt, response, extra)


def without_letter_a(prompt, response, extra):
    """A gold checker that rejects the shortcut `char_fraction` pays for: 1 − the fraction of
    the response that is 'a'."""
    return 1.0 - (response.count("a") / len(response) if response else 0.0)


def constant_for_even_numbers(prompt, response, extra):
    """0.5 for every response to a prompt whose last number is even (a group with no signal),
    else a value that differs between responses (a hash of the text)."""
    import re

    numbers = re.findall(r"\d+", prompt)
    if numbers and int(numbers[-1]) % 2 == 0:
        return 0.5
    return (sum(map(ord, response)) % 97) / 97


def verl_style(data_source, solution_str, ground_truth, extra_info=None):
    """A verl-style `compute_score` (its own signature, a dict result): called with rlfleet's
    rule signature it returns a dict, which no rlfleet rule may."""
    return {"score": float(str(ground_truth) in str(solution_str)), "acc": 1.0}


def verl_without_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature, but a dict with no 'score'."""
    return {"acc": 1.0}


def one_argument(text):
    """A signature no reward style has."""
    return 0.0


def constant_reward(prompt, response, extra):
    """The same reward for every response: a group-relative estimator gets no signal."""
    return 0.5


def raises_on_model_output(prompt, response, extra):
    """Passes the dry call (its placeholder response "0") and raises on every generated response."""
    if response == "0":
        return 0.0
    raise ValueError(f"cannot parse an answer from {response[:20]!r}")


def sleeps_forever(prompt, response, extra):
    time.sleep(3600)


def trl_one_value(prompts, completions, **kwargs):
    """A TRL-style function that returns one value for the whole batch."""
    return [1.0]

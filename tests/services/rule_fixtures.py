"""Rule functions for the tests, imported by name (`tests.services.rule_fixtures:NAME`)."""

from __future__ import annotations

import time


def by_length(prompt, response, extra):
    return float(len(response))


def raises(prompt, response, extra):
    raise RuntimeError("broken reward code")


def returns_nan(prompt, response, extra):
    return float("nan")


def hangs_on_x(prompt, response, extra):
    if "x" in response:
        time.sleep(3600)
    return 1.0


def wrong_signature(response):
    return 1.0

"""Rule-based rewards: functions named `package.module:function` in the config.

A rule function has the signature

    fn(prompt: str, response: str, extra: Mapping[str, Any]) -> float | None

`extra` holds the example's fields as they are (e.g. a reference `answer`). Functions written
for verl, TRL or OpenRLHF run unmodified too (`services/reward_styles.py`). Returning None, NaN or
inf, raising, or running past its timeout marks the response *unscorable* — it is never
turned into a silent 0. Calls run in separate processes, so a rule that hangs is killed
without taking the reward service down. This module imports no torch: it is cheap to load
in those processes.

Built-ins (use as `rlfleet.services.rules:NAME`): `exact_match`, `math_verify` (math-verify:
LaTeX, fractions, sets, intervals, units), `math_answer` (a plain number parser; math_verify's
fallback), `format_check`, `length_penalty`, `char_fraction`.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

RuleFn = Callable[[str, str, Mapping[str, Any]], "float | None"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


# ---------------------------------------------------------------- built-in rules
def final_answer(response: str) -> str:
    """The answer a response commits to: after the last '####', else the last \\boxed{...},
    else its last non-empty line."""
    if "####" in response:
        return response.rsplit("####", 1)[1].strip()
    boxed = _BOXED.findall(response)
    if boxed:
        return boxed[-1].strip()
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exact_match(prompt: str, response: str, extra: Mapping[str, Any]) -> float | None:
    """1.0 if the final answer equals extra['answer'] (whitespace-trimmed), else 0.0."""
    if "answer" not in extra:
        return None
    return float(final_answer(response) == str(extra["answer"]).strip())


def _parse_number(text: str) -> float | None:
    text = text.replace(",", "")
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def math_answer(prompt: str, response: str, extra: Mapping[str, Any]) -> float | None:
    """1.0 if the last number in the final answer equals extra['answer'] numerically
    (relative tolerance 1e-6; '1,000', '0.5' and '1/2' are understood), else 0.0."""
    target = _parse_number(str(extra.get("answer", "")))
    if target is None:
        return None
    numbers = _NUMBER.findall(final_answer(response))
    got = _parse_number(numbers[-1]) if numbers else None
    return float(got is not None and math.isclose(got, target, rel_tol=1e-6, abs_tol=1e-9))


MATH_VERIFY_TIMEOUT_S = 3
"""math_verify's own limits, whole seconds (it uses SIGALRM), on parsing and on comparing one answer."""


def math_verify(prompt: str, response: str, extra: Mapping[str, Any]) -> float | None:
    """1.0 if the response's final answer is mathematically equal to the reference, else 0.0,
    by Hugging Face's `math-verify` (LaTeX, fractions, sets, intervals, units, percentages,
    equations). The reference: extra['answer'], else a verl row's reward_model.ground_truth;
    the response's answer: after its last '####' if it has one, else its last boxed or final
    expression. Where math-verify finds no answer in the response, `math_answer` decides.
    None: no reference, or one math-verify cannot read."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    reference = extra.get("answer")
    if reference is None and isinstance(extra.get("reward_model"), Mapping):
        reference = extra["reward_model"].get("ground_truth")
    if reference is None:
        return None
    text = str(reference).strip()
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(text if "$" in text or "\\boxed" in text else f"${text}$", configs,
                 parsing_timeout=MATH_VERIFY_TIMEOUT_S) or parse(text, configs, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    if not gold:
        return None
    answer = response.rsplit("####", 1)[1] if "####" in response else response
    got = parse(answer, configs, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    if not got:
        return math_answer(prompt, response, {"answer": text})
    return float(verify(gold, got, timeout_seconds=MATH_VERIFY_TIMEOUT_S))


def format_check(prompt: str, response: str, extra: Mapping[str, Any]) -> float | None:
    """1.0 if the response matches extra['format'] (a regex, full match, DOTALL), by default
    'ends with #### <answer>', else 0.0."""
    pattern = extra.get("format", r".*####\s*\S+\s*")
    return float(re.fullmatch(pattern, response, flags=re.DOTALL) is not None)


def length_penalty(prompt: str, response: str, extra: Mapping[str, Any]) -> float | None:
    """−(characters over extra['target_length'] (default 256)) / target_length, at most 0."""
    target = int(extra.get("target_length", 256))
    return -max(0, len(response) - target) / target


def char_fraction(prompt: str, response: str, extra: Mapping[str, Any]) -> float | None:
    """The fraction of the response's characters equal to extra['target'] (0 for an empty response)."""
    target = extra.get("target")
    if not isinstance(target, str) or len(target) != 1:
        return None
    return response.count(target) / len(response) if response else 0.0


# ---------------------------------------------------------------- loading and running
def load_rule(path: str, field: str, style: str = "auto") -> str:
    """Import `module:function` (or `file.py:function`) and return its calling style
    (`services/reward_styles.py`): `style`, or the one its signature says when "auto"."""
    from rlfleet.services.reward_styles import ACCEPTED, detect_style
    from rlfleet.services.sandbox import import_path

    module_name, _, attr = path.rpartition(":")
    try:
        fn = import_path(path)
    except AttributeError:
        raise ValueError(f"{field}={path!r}: {module_name} has no function {attr!r}") from None
    except Exception as err:  # noqa: BLE001 - any import failure is a config error here
        raise ValueError(f"{field}={path!r}: module {module_name!r} does not import ({type(err).__name__}: {err})") \
            from None
    if not callable(fn):
        raise ValueError(f"{field}={path!r}: {module_name} has no function {attr!r}")
    detected = detect_style(fn)
    if style == "auto":
        if detected is None:
            raise ValueError(f"{field}={path!r}: {attr}{_signature(fn)} fits no reward style. {ACCEPTED}")
        return detected
    if style == "rlfleet" and not _binds(fn):
        raise ValueError(f"{field}={path!r}: a rule must accept (prompt, response, extra); "
                         f"{attr} has signature {_signature(fn)}")
    return style


def _binds(fn: Callable[..., Any]) -> bool:
    try:
        inspect.signature(fn).bind("prompt", "response", {})
    except (TypeError, ValueError):
        return False
    return True


def _signature(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(?)"


@dataclass(frozen=True)
class RuleOutcome:
    """One rule's verdict on one response: a finite value, or why there is none."""

    value: float | None
    reason: str | None = None
    """None when scorable; else 'raised', 'timeout', 'crashed', 'non_finite', 'none' or
    'not_a_number'."""
    detail: str | None = None
    """What happened: the exception ('ValueError: …'), the value returned ('returned dict
    {'score': 1.0}'), the exit code of a crashed process."""
    logs: Mapping[str, float] | None = None
    """Numbers the function returned beside its value (a verl dict's other keys)."""

    @property
    def why(self) -> str | None:
        """The reason with its detail, e.g. "raised (KeyError: 'answer')"; None when scorable."""
        if self.reason is None:
            return None
        return self.reason if self.detail is None else f"{self.reason} ({self.detail})"


def _shown(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def judge(status: str, value: Any) -> RuleOutcome:
    """Turn a call's reply (`ProcessWorkers.run`) into a value or an unscorable reason."""
    if status == "error":
        return RuleOutcome(None, "raised", str(value) if value is not None else None)
    if status == "timeout":
        return RuleOutcome(None, status)
    if status == "crashed":
        return RuleOutcome(None, status, f"exit code {value}")
    from rlfleet.services.reward_styles import Scored

    if isinstance(value, Scored):
        return replace(judge("ok", value.value), logs=value.logs)
    if value is None:
        return RuleOutcome(None, "none", "returned None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return RuleOutcome(None, "not_a_number", f"returned {type(value).__name__} {_shown(value)}")
    if not math.isfinite(value):
        return RuleOutcome(None, "non_finite", f"returned {value}")
    return RuleOutcome(float(value))


class RuleRunner:
    """Runs rule functions in pre-started processes (`ProcessWorkers`), each call under the
    rule's timeout; a hung or crashed process is replaced without taking the service down.
    `styles`: each path's calling style (`load_rule`; a path not in it is detected on first use)."""

    def __init__(self, paths: Sequence[str], processes: int = 2, styles: Mapping[str, str] | None = None):
        # imported here: the rule functions above load with the standard library alone (the
        # TRL side of bench/e2e_grpo.py loads this file outside rlfleet)
        from rlfleet.services.reward_styles import ADAPTER
        from rlfleet.services.sandbox import ProcessWorkers

        self._styles = dict(styles or {})
        self._workers = ProcessWorkers([*paths, ADAPTER], processes, name="reward rule")

    def style(self, path: str) -> str:
        if path not in self._styles:
            self._styles[path] = load_rule(path, field=path)
        return self._styles[path]

    def run(
        self,
        path: str,
        timeout_s: float,
        prompts: Sequence[str],
        responses: Sequence[str],
        extras: Sequence[Mapping[str, Any]],
        response_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RuleOutcome]:
        """One outcome per response; a call's `timeout_s` counts from when a ready process
        took it (a batch-style function's call is the whole batch)."""
        from rlfleet.services.reward_styles import ADAPTER, BATCH_STYLES, batch_call_args

        style = self.style(path)
        if style in BATCH_STYLES:
            if not prompts:
                return []
            args = (path, style, *batch_call_args(prompts, responses, extras, response_ids))
            [(status, value)] = self._workers.run(ADAPTER, [args], timeout_s)
            if status == "ok" and isinstance(value, list) and len(value) == len(prompts):
                return [judge("ok", v) for v in value]
            return [judge(status, value)] * len(prompts)
        calls = [(p, r, dict(e)) for p, r, e in zip(prompts, responses, extras, strict=True)]
        if style == "rlfleet":
            return [judge(*reply) for reply in self._workers.run(path, calls, timeout_s)]
        return [judge(*reply) for reply in self._workers.run(ADAPTER, [(path, style, *c) for c in calls], timeout_s)]

    def close(self) -> None:
        self._workers.close()


def weighted_rules(runner: RuleRunner, rules: Sequence[Any], prompts: Sequence[str], responses: Sequence[str],
                   extras: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """Σ weight · value over `rules` (each with `function`, `weight`, `timeout_s`) per
    response; None where any rule could not score it (the gold checker's score)."""
    totals: list[float | None] = [0.0] * len(prompts)
    for rule in rules:
        for i, outcome in enumerate(runner.run(rule.function, rule.timeout_s, prompts, responses, extras)):
            prior = totals[i]
            totals[i] = None if outcome.value is None or prior is None else prior + rule.weight * outcome.value
    return totals

"""No config field is read by nothing: every leaf field of `RunConfig` is read somewhere in the
package — as an attribute (`cfg.rollout.temperature`), a keyword or a string key (a section
dumped or looked up by name) — outside its own definition."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rlfleet.common.config import RunConfig
from scripts.gen_reference import config_rows

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "learner", "rollout", "services", "deploy")


def _reads() -> set[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.keyword) and node.arg:
                    names.add(node.arg)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                    names.add(node.value)
    return names


@pytest.mark.unit
def test_every_config_field_has_a_reader():
    reads = _reads()
    unread = [path for path, *_ in config_rows(RunConfig) if path.rsplit(".", 1)[-1].replace("[]", "") not in reads]
    assert unread == []

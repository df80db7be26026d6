"""Bad paths and reward functions in a config: exit code 2 naming the field, before Ray starts
and before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet.deploy.app import cli

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "grpo_rule.yaml")
MISSING = "/nonexistent/model"


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("command", "field"), [
    (["train", EXAMPLE], "model.path"),
    (["train", EXAMPLE], "model.tokenizer_path"),
    (["train", EXAMPLE], "reward.model_path"),
    (["sft"], "sft.init_from"),
    (["rm"], "rm.init_from"),
    (["rm"], "rm.sample_from"),
    (["dpo"], "dpo.init_from"),
    (["demo"], "model.path"),
])
def test_a_folder_that_does_not_exist_is_named(tmp_path, capsys, command, field):
    run_dir = tmp_path / "run"
    code, err = run_cli([*command, f"{field}={MISSING}", f"logging.run_dir={run_dir}"], capsys)
    assert code == 2
    assert f"{field}='{MISSING}': the folder does not exist" in err
    assert "Traceback" not in err and "Repo id" not in err
    assert not run_dir.exists()  # nothing written


def test_a_folder_that_is_not_a_model_and_a_missing_data_file_are_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(["train", EXAMPLE, f"model.path={empty}", f"data.train_path={tmp_path / 'no.jsonl'}",
                         f"logging.run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert f"model.path='{empty}': not a model folder (no config.json in it)" in err
    assert f"data.train_path='{tmp_path / 'no.jsonl'}': no such file or folder" in err  # every problem at once


@pytest.mark.parametrize(("rule", "message"), [
    ("no_such_module:f", "module 'no_such_module' does not import"),
    ("rlfleet.services.rules:no_such_function", "has no function 'no_such_function'"),
])
def test_a_reward_rule_that_does_not_import_is_named(tmp_path, capsys, rule, message):
    code, err = run_cli(["train", EXAMPLE, f"reward.rules=[{{function: '{rule}'}}]",
                         f"logging.run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert f"reward.rules[0].function={rule!r}: " in err and message in err
    assert not (tmp_path / "run").exists()


def test_bad_inputs_fail_before_ray_starts(tmp_path):
    """In a fresh process: exit 2, a message rather than a traceback, and Ray never started."""
    code = ("import sys; from rlfleet.deploy.app import cli; rc = cli.main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules or not sys.modules['ray'].is_initialized(); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "train", EXAMPLE, f"model.path={MISSING}",
                           "reward.rules=[{function: 'no_such_module:f'}]", f"logging.run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.path=" in done.stderr and "reward.rules[0].function=" in done.stderr
    assert done.stderr.count("\n") <= 4, done.stderr  # a message, not a traceback


def test_tiny_model_builds_the_depth_asked_and_names_a_bad_one(tmp_path, capsys):
    assert cli.main(["tiny-model", str(tmp_path / "deep"), "--layers", "4"]) == 0
    assert json.loads((tmp_path / "deep" / "config.json").read_text())["num_hidden_layers"] == 4
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tiny-model", str(tmp_path / "none"), "--layers", "0"])
    assert exit_.value.code == 2 and "--layers: must be a whole number of at least 1 (got '0')" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_a_bad_environment_or_tool_is_named_before_anything_starts(tmp_path, capsys):
    """`environment.path` and `environment.tools` (a config check, then the import and the
    interface), every problem at once, nothing written."""
    code, err = run_cli(["demo", "--agent", "environment.path=rlfleet.services.tools:ToolBox",
                         "environment.tools=[no_such_module:f, 'rlfleet.services.tools:find_tool_call']",
                         f"logging.run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert "environment.path='rlfleet.services.tools:ToolBox': ToolBox has no method reset()" in err
    assert "environment.tools[0]='no_such_module:f': No module named 'no_such_module'" in err
    assert "environment.tools[1]='rlfleet.services.tools:find_tool_call': tool 'find_tool_call'" in err
    code, err = run_cli(["demo", "--agent", "environment.path=calc", f"logging.run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "environment.path='calc': expected a built-in name (calculator, guess_number)" in err
    code, err = run_cli(["demo", "--agent", "reward.rules=[{function: 'rlfleet.services.rules:exact_match'}]",
                         f"logging.run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "scores episodes with the environment's own rewards; unset reward.rules" in err
    code, err = run_cli(["demo", "--agent", "rollout.max_staleness=1", "rollout.partial_rollout=true",
                         f"logging.run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "rollout.partial_rollout=true is for single-turn generation" in err
    assert not (tmp_path / "run").exists()

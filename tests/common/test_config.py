"""RunConfig: bad input exits with code 2 naming the field; YAML + overrides round-trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from rlfleet.common import config as config_module
from rlfleet.common.config import RunConfig, Section
from rlfleet.common.config_io import ConfigError, config_from_dict, dump_config, load_config
from rlfleet.deploy.app.cli import main

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def check(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["config", "check", *args])
    captured = capsys.readouterr()
    return code, captured.err


def test_wrong_type_names_field_file_and_line(tmp_path, capsys):
    path = write(tmp_path, "seed: 1\nrollout:\n  num_workers: two\n")
    code, err = check([str(path)], capsys)
    assert code == 2
    assert f"rollout.num_workers ({path}:3)" in err
    assert "valid integer" in err and "'two'" in err


def test_out_of_range_value_names_field(tmp_path, capsys):
    path = write(tmp_path, "algorithm:\n  gamma: 1.5\n  clip_low: 0\n")
    code, err = check([str(path)], capsys)
    assert code == 2
    assert f"algorithm.gamma ({path}:2)" in err and "less than or equal to 1" in err
    assert f"algorithm.clip_low ({path}:3)" in err and "greater than 0" in err


def test_unknown_key_suggests_closest(tmp_path, capsys):
    path = write(tmp_path, "learner:\n  lr: 1.0e-6\n  minibach_size: 4\n")
    code, err = check([str(path)], capsys)
    assert code == 2
    assert f"learner.minibach_size ({path}:3): unknown key; did you mean 'minibatch_size'?" in err


def test_unknown_section_suggests_closest(capsys):
    code, err = check(["/dev/null", "rolout.num_workers=2"], capsys)
    assert code == 2
    assert "rolout (override 'rolout.num_workers=2'): unknown key; did you mean 'rollout'?" in err


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["learner.minibatch_size=3"], "learner.minibatch_size=3 must divide"),
        (["rollout.samples_per_prompt=1"], "rollout.samples_per_prompt must be >= 2"),
        (["algorithm.dual_clip=1.0"], "algorithm.dual_clip"),
        (["reference.enabled=false"], "algorithm.kl_in='reward' needs reference.enabled=true"),
        (["model.tiny.num_heads=8"], "model.tiny: head_dim"),
        (["rollout.partial_rollout=true"], "rollout.partial_rollout=true interrupts generation that overlaps a push"),
    ],
)
def test_cross_field_rules_name_the_field(overrides, field, capsys):
    code, err = check(["/dev/null", *overrides], capsys)
    assert code == 2
    assert field in err


def test_cross_field_rule_points_at_yaml_line(tmp_path, capsys):
    path = write(tmp_path, "rollout:\n  prompts_per_step: 3\n  samples_per_prompt: 3\nlearner:\n  minibatch_size: 4\n")
    code, err = check([str(path)], capsys)
    assert code == 2
    assert "learner.minibatch_size=4 must divide" in err and f"({path}:5)" in err


def test_bad_files_are_named(tmp_path, capsys):
    code, err = check([str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "missing.yaml: cannot be read" in err
    code, err = check([str(write(tmp_path, "learner:\n  lr: [1,\n"))], capsys)
    assert code == 2 and "run.yaml:3: invalid YAML" in err
    code, err = check([str(write(tmp_path, "- 1\n- 2\n"))], capsys)
    assert code == 2 and "top level must be a mapping" in err
    code, err = check(["/dev/null", "learner.lr"], capsys)
    assert code == 2 and "override 'learner.lr': expected key.path=value" in err
    code, err = check([str(write(tmp_path, "seed: 1\n")), "seed.x=1"], capsys)
    assert code == 2 and "override 'seed.x=1': seed is a value, not a section" in err
    code, err = check(["/dev/null", "seed.x=1"], capsys)
    assert code == 2 and "seed (override 'seed.x=1'): Input should be a valid integer" in err


def test_exit_code_2_from_a_real_process(tmp_path):
    path = write(tmp_path, "learner:\n  lr: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rlfleet.deploy.app.cli", "config", "check", str(path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert f"learner.lr ({path}:2): Input should be greater than 0 (got -1)" in proc.stderr


def test_yaml_and_overrides_round_trip(tmp_path):
    path = write(tmp_path, "seed: 3\nlearner:\n  lr: 2.0e-6\nreward:\n  rules:\n    - function: pkg.mod:fn\n")
    cfg = load_config(path, ["learner.lr=1e-6", 'rollout.stop=["\\n", "."]', "algorithm.dual_clip=3"])
    assert cfg.seed == 3
    assert cfg.learner.lr == pytest.approx(1e-6)
    assert cfg.rollout.stop == ["\n", "."]
    assert cfg.algorithm.dual_clip == 3.0
    assert cfg.reward.rules[0].function == "pkg.mod:fn"
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert config_from_dict(cfg.model_dump()) == cfg


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.learner.lr = 1.0  # type: ignore[misc]


def test_every_section_forbids_extras_and_documents_every_field():
    sections = [
        obj for obj in vars(config_module).values()
        if isinstance(obj, type) and issubclass(obj, Section) and obj is not Section
    ]
    assert len(sections) >= 12
    for section in sections:
        assert section.model_config["extra"] == "forbid", section
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no docstring"


def test_schema_is_printed_with_descriptions(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    learner = schema["$defs"]["LearnerConfig"]["properties"]
    assert learner["lr"]["description"] == "Policy learning rate (AdamW)."
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    load_config(path)


def test_config_error_is_value_error():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"learner": {"lr": "fast"}})
    assert "learner.lr" in str(info.value)


def test_a_data_file_needs_a_reward_source_of_its_own():
    """A built-in task's checker scores only that task's prompts; prompts from a file need a source."""
    with pytest.raises(ConfigError, match=r"reward: no reward source.*without data.train_path"):
        config_from_dict({"data": {"train_path": "train.jsonl"}})
    cfg = config_from_dict({"data": {"train_path": "train.jsonl"},
                            "reward": {"rules": [{"function": "rlfleet.services.rules:exact_match"}]}})
    assert cfg.reward.rules[0].function.endswith(":exact_match")
    with pytest.raises(ConfigError, match=r"learner.critic_init='reward_model' needs reward.model_path"):
        config_from_dict({"learner": {"critic_init": "reward_model"}, "algorithm": {"advantage_estimator": "gae"}})

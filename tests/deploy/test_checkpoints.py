"""Checkpoint folders are complete or ignored; old ones are pruned; metrics follow a resume."""

from __future__ import annotations

import pytest

from rlfleet.common.metrics import MetricsWriter, read_metrics
from rlfleet.deploy.loop.checkpoints import CheckpointManager, read_state

pytestmark = pytest.mark.unit


def fill(folder) -> None:
    (folder / "weights.txt").write_text("w")


def test_only_complete_checkpoints_count_and_the_last_k_are_kept(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep_last=2)
    assert ckpts.latest() is None
    for step in (1, 2, 3):
        ckpts.save(step, fill, {"data": {"epoch": 0, "index": step}})
    assert [p.name for p in ckpts.complete()] == ["step_00000002", "step_00000003"]
    assert read_state(ckpts.latest()) == {"step": 3, "data": {"epoch": 0, "index": 3}}
    # A crash while writing step 4 leaves a temporary folder, and a folder without its state
    # file is not complete either: resuming picks step 3.
    (ckpts.root / ".tmp-step_00000004").mkdir()
    (ckpts.root / "step_00000005").mkdir()
    assert ckpts.latest().name == "step_00000003"


def test_a_failing_write_leaves_the_previous_checkpoint_intact(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep_last=1)
    ckpts.save(1, fill, {})

    def broken(folder):
        fill(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpts.save(2, broken, {})
    assert ckpts.latest().name == "step_00000001"
    assert (ckpts.latest() / "weights.txt").read_text() == "w"
    assert sorted(p.name for p in ckpts.root.iterdir()) == ["step_00000001"]  # the partial one is gone
    # What a killed process leaves (a temporary folder, a step folder without its state file)
    # is ignored by `latest` and removed before a run resumes.
    (ckpts.root / ".tmp-step_00000003").mkdir()
    fill(ckpts.root / ".tmp-step_00000003")
    (ckpts.root / "step_00000004").mkdir()
    assert ckpts.latest().name == "step_00000001"
    assert sorted(p.name for p in ckpts.remove_partial()) == [".tmp-step_00000003", "step_00000004"]
    assert sorted(p.name for p in ckpts.root.iterdir()) == ["step_00000001"]


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"reward": step / 10, "loss/value_avg": None, "bad": float("nan")})
    assert read_metrics(tmp_path)[1] == {"step": 2, "reward": 0.2, "loss/value_avg": None, "bad": None}
    writer.truncate_after(2)
    writer.write(3, {"reward": 0.5})
    assert [(r["step"], r["reward"]) for r in read_metrics(tmp_path)] == [(1, 0.1), (2, 0.2), (3, 0.5)]


def test_bad_training_data_exits_2_naming_the_line_and_keeps_checkpoints(tmp_path, capsys):
    from rlfleet.deploy.app import cli

    ckpts = CheckpointManager(tmp_path / "run", keep_last=2)
    ckpts.save(4, fill, {"data": {"epoch": 0, "index": 4, "size": 2}})
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "ok"}\n{"prompt": "missing brace"\n')
    args = ["train", f"data.train_path={data}", f"logging.run_dir={tmp_path / 'run'}",
            "reward.rules=[{function: 'rlfleet.services.rules:exact_match'}]"]
    assert cli.main(args) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err
    assert ckpts.latest().name == "step_00000004" and (ckpts.latest() / "weights.txt").read_text() == "w"
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nope"), f"logging.run_dir={tmp_path}"]) == 2
    assert f"--checkpoint={str(tmp_path / 'nope')!r}: the folder does not exist" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tmp_path), f"logging.run_dir={tmp_path}"]) == 2
    assert "neither a checkpoint folder nor an HF model folder" in capsys.readouterr().err



def test_a_lost_services_node_stops_the_run_naming_the_checkpoint_even_when_the_loop_re_raised_it(tmp_path):
    """`role_lost` finds a node-lost ServiceError through the chain the overlapped loop re-raises
    (its threads' errors), and names the last complete checkpoint; any other error is not a
    lost service (the learner is asked next, here: it answers)."""
    from rlfleet.common.config import RunConfig
    from rlfleet.deploy.loop.run_state import ServiceLostError, role_lost
    from rlfleet.services.client import ServiceError

    ckpts = CheckpointManager(tmp_path, keep_last=2)
    ckpts.save(4, lambda folder: None, {"data": {}})

    class Answering:
        def lost(self):
            return None

    parts = type("Parts", (), {"learner": Answering()})()
    try:
        try:
            raise ServiceError("the reward actor's node 0123 (10.0.0.2) is dead and no live node can host it",
                               node_lost=True)
        except ServiceError as inner:
            raise RuntimeError("the scoring thread failed") from inner
    except RuntimeError as err:
        lost = role_lost(RunConfig(), parts, ckpts, 6, err)
    assert isinstance(lost, ServiceLostError) and lost.exit_code == 4
    assert "the run stopped at step 6: the reward actor's node 0123" in str(lost)
    assert f"The last complete checkpoint is {tmp_path / 'checkpoints' / 'step_00000004'} (step 4)" in str(lost)
    assert role_lost(RunConfig(), parts, ckpts, 6, ServiceError("died 4 times")) is None

"""The best checkpoint by an evaluation metric, and the over-optimisation guard's rule."""

from __future__ import annotations

import pytest

from rlfleet.common.config_run import CheckpointConfig, GuardConfig
from rlfleet.deploy.loop.checkpoints import CheckpointManager
from rlfleet.deploy.loop.guard import GoldWatch

pytestmark = pytest.mark.unit


def evals(pairs):
    return [{"step": 10 * i, "eval/gold": g, "eval/reward": p} for i, (g, p) in enumerate(pairs)]


def test_the_guard_acts_when_gold_stays_below_its_best_while_the_proxy_rises():
    watch = GoldWatch(GuardConfig(patience=2), CheckpointConfig(keep_best="eval/gold"))
    # gold peaks at step 20; then falls twice while the proxy climbs past its value there
    rows = evals([(0.3, 1.0), (0.4, 1.2), (0.5, 1.5), (0.45, 1.8), (0.4, 2.0)])
    verdicts = [watch.see(r["step"], r) for r in rows]
    assert [v.best for v in verdicts] == [True, True, True, False, False]
    assert [v.act is not None for v in verdicts] == [False, False, False, False, True]
    assert "eval/gold has stayed below its best (0.5 at step 20) for 2 evaluations and is now 0.4" in verdicts[-1].act
    assert "eval/reward rose from 1.5 to 2" in verdicts[-1].act


@pytest.mark.parametrize("pairs", [
    [(0.5, 1.5), (0.45, 1.4), (0.4, 1.3)],  # gold falls, but so does the proxy: no gaming
    [(0.5, 1.5), (0.45, 1.8), (0.5, 2.0), (0.45, 2.1)],  # gold comes back to its best: the count restarts
    [(0.5, 1.5), (0.5, 1.8), (0.5, 2.0)],  # a flat gold is not a fall
])
def test_the_guard_does_not_act_without_the_over_optimisation_signature(pairs):
    watch = GoldWatch(GuardConfig(patience=2), CheckpointConfig())
    assert all(watch.see(r["step"], r).act is None for r in evals(pairs))


def test_min_delta_ignores_small_dips_and_a_resumed_watch_remembers():
    cfg = GuardConfig(patience=2, min_delta=0.05)
    rows = evals([(0.5, 1.0), (0.47, 1.5), (0.46, 2.0), (0.4, 2.2), (0.39, 2.3)])
    watch = GoldWatch(cfg, CheckpointConfig())
    assert [watch.see(r["step"], r).act is not None for r in rows] == [False, False, False, False, True]
    resumed = GoldWatch(cfg, CheckpointConfig())
    resumed.replay(rows, upto=30)  # what metrics.jsonl held up to the resumed step
    assert resumed.see(40, rows[4]).act is not None


def test_the_best_checkpoint_outlives_keep_last_and_a_fresh_run_forgets_it(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep_last=1)
    fill = lambda folder: (folder / "w.txt").write_text("w")  # noqa: E731
    ckpts.save(0, fill, {})
    ckpts.mark_best(0, "eval/gold", 0.5)
    for step in (1, 2, 3):
        ckpts.save(step, fill, {})
    assert [p.name for p in ckpts.complete()] == ["step_00000000", "step_00000003"]
    assert ckpts.best() == {"step": 0, "metric": "eval/gold", "value": 0.5, "path": str(ckpts.folder(0))}
    ckpts.mark_best(3, "eval/gold", 0.6)
    ckpts.save(4, fill, {})  # step 0 is no longer the best: keep_last removes it
    assert [p.name for p in ckpts.complete()] == ["step_00000003", "step_00000004"]
    ckpts.save(5, fill, {})
    assert [p.name for p in ckpts.complete()] == ["step_00000003", "step_00000005"]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of step 7"):
        ckpts.mark_best(7, "eval/gold", 0.9)
    ckpts.forget_best()
    assert ckpts.best() is None


def test_a_smaller_is_better_metric_and_a_missing_value():
    watch = GoldWatch(GuardConfig(), CheckpointConfig(keep_best="eval/loss", best_mode="min"))
    assert [watch.see(i, {"eval/loss": v}).best for i, v in enumerate([2.0, 1.0, 1.5, None, float("nan"), 0.5])] == [
        True, True, False, False, False, True]

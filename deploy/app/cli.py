"""The `rlfleet` command line.

    rlfleet demo [CONFIG] [key.path=value ...] [--rlhf | --agent] [--out DIR]
                                                   the built-in job: SFT → GRPO (→ RM → PPO), report
    rlfleet smoke [CONFIG] [key.path=value ...]    check the install: vLLM vs transformers log-probs
    rlfleet train CONFIG [key.path=value ...] [--force]
                                                   train; resumes from the newest checkpoint
    rlfleet eval CONFIG --checkpoint DIR [key.path=value ...]
                                                   score a checkpoint's greedy answers
    rlfleet sft | rm | dpo CONFIG [key.path=value ...]
                                                   a supervised stage (config sections sft/rm/dpo)
    rlfleet submit CONFIG [key.path=value ...] [--address URL] [--working-dir DIR] [--wait]
                                                   submit a training run as a Ray job; prints its id
    rlfleet scale JOB --rollout-workers K [--address ADDRESS] [--wait-s S]
                                                   resize a running job's rollout fleet
    rlfleet plan CONFIG [key.path=value ...] [--gpu-memory 80GiB]
                                                   memory per role and device; exit 2 if it cannot fit
    rlfleet config check CONFIG [key.path=value ...]   validate; print the resolved YAML
    rlfleet config schema                          the JSON schema of the config
    rlfleet tiny-model OUT [--reward] [--seed N] [--layers N]   build a tiny model folder

Bad configuration exits with code 2 and a message naming each field at fault; a run that cannot
learn with 3 (`run_health`); a run whose learner was lost with 4, naming the checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rlfleet.common.config import RunConfig
from rlfleet.common.config_io import ConfigError, dump_config, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlfleet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the built-in job: SFT then GRPO on the tiny model, with a report")
    _config_args(demo, required=False)
    demo.add_argument("--rlhf", action="store_true", help="also train a reward model and run PPO against it")
    demo.add_argument("--agent", action="store_true",
                      help="instead: multi-turn RL, a tiny BPE model learns to use a calculator tool")
    demo.add_argument("--out", default=None, help="run folder (default runs/demo; same as logging.run_dir=...)")

    smoke = sub.add_parser("smoke", help="check the install: vLLM in a Ray actor agrees with transformers")
    _config_args(smoke, required=False)

    train = sub.add_parser("train", help="train (resumes from the run folder's newest checkpoint)")
    _config_args(train, required=True)
    train.add_argument("--force", action="store_true",
                       help="run even where `rlfleet plan` says it cannot fit (cluster.check_fit=false)")

    evaluate = sub.add_parser("eval", help="score a checkpoint's greedy answers on the eval prompts")
    _config_args(evaluate, required=True)
    evaluate.add_argument("--checkpoint", required=True,
                          help="a checkpoint folder (run_dir/checkpoints/step_N) or an HF model folder")

    for stage, text in (("sft", "supervised fine-tuning on prompt → response pairs"),
                        ("rm", "train a reward model on (prompt, chosen, rejected) pairs"),
                        ("dpo", "DPO on (prompt, chosen, rejected) pairs")):
        _config_args(sub.add_parser(stage, help=text), required=True)

    submit = sub.add_parser("submit", help="submit a training run to a Ray cluster as a job; prints its id")
    _config_args(submit, required=True)
    submit.add_argument("--address", default=None,
                        help="the cluster's dashboard URL (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    submit.add_argument("--working-dir", default=".",
                        help="folder uploaded with the job; CONFIG is relative to it (default: .)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")

    scale = sub.add_parser("scale", help="change a running job's number of rollout workers (at its next step)")
    scale.add_argument("job", help="the job's submission id (or a local run's absolute run folder)")
    scale.add_argument("--rollout-workers", type=int, required=True)
    scale.add_argument("--address", default=None,
                       help="the cluster's GCS address, host:port (default: the cluster of this node)")
    scale.add_argument("--wait-s", type=float, default=60.0,
                       help="how long to wait for a job that is still starting (default: 60)")

    plan = sub.add_parser("plan", help="the memory each role takes on its device, and whether the run fits")
    _config_args(plan, required=True)
    plan.add_argument("--gpu-memory", default=None,
                      help="memory of each GPU, e.g. 80GiB (default: cluster.gpu_memory_gib, else the local GPU's)")

    config = sub.add_parser("config", help="check a config or print its schema")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _config_args(config_sub.add_parser("check", help="validate and print the resolved YAML"), required=True)
    config_sub.add_parser("schema", help="print the JSON schema of RunConfig")

    tiny = sub.add_parser("tiny-model", help="build a tiny model (and tokenizer) folder")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--reward", action="store_true", help="a reward model instead of a causal LM")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=_at_least_one, default=None, help="decoder layers (default: model.tiny's)")
    return parser


def _config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-6")


def _split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`rlfleet demo learner.lr=1` has no file: a first positional with '=' is an override."""
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:
        return None, [path, *overrides]
    return path, overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow an option (`eval CONFIG --checkpoint DIR k=v`).
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "config" and args.config_command == "schema":
            sys.stdout.write(json.dumps(RunConfig.model_json_schema(), indent=2) + "\n")
            return 0
        if args.command == "tiny-model":
            return _tiny_model(args)
        if args.command == "scale":
            return _scale(args)
        path, overrides = _split_config_arg(args)
        if args.command == "demo":
            from rlfleet.deploy.app.demo import DEMO_DEFAULTS

            out = [f"logging.run_dir={args.out}"] if args.out else []
            if args.agent:
                from rlfleet.deploy.app.agent_demo import AGENT_DEFAULTS
            cfg = load_config(path, [*overrides, *out], base=AGENT_DEFAULTS if args.agent else DEMO_DEFAULTS)
        else:
            forced = ["cluster.check_fit=false"] if getattr(args, "force", False) else []
            cfg = load_config(path, [*overrides, *forced])
    except ConfigError as err:
        sys.stderr.write(f"rlfleet: {err}\n")
        return ConfigError.exit_code
    if args.command == "config":
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.command == "submit":
        return _submit(args, path, overrides)
    if args.command == "plan":
        return _plan(args, cfg)
    if args.command in ("train", "eval", "sft", "rm", "dpo", "demo"):
        return _run(args, cfg)
    from rlfleet.deploy.app import smoke

    return smoke.main(cfg)


def _run(args: argparse.Namespace, cfg: RunConfig) -> int:
    import logging

    from rlfleet.common.data import DataError
    from rlfleet.deploy.loop.health import RunHealthError
    from rlfleet.deploy.loop.run_state import LostError

    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(name)s: %(message)s")
    try:
        return _dispatch(args, cfg)
    except (ConfigError, DataError, FileNotFoundError) as err:  # bad input: named, exit 2, nothing saved is touched
        sys.stderr.write(f"rlfleet: {err}\n")
        return ConfigError.exit_code
    except RunHealthError as err:  # a run that cannot learn: named, exit 3, its checkpoints kept
        sys.stderr.write(f"rlfleet: {err}\n")
        return RunHealthError.exit_code
    except LostError as err:  # the learner's or a service's node lost: named with the checkpoint to resume from
        sys.stderr.write(f"rlfleet: {err}\n")
        return LostError.exit_code


def _dispatch(args: argparse.Namespace, cfg: RunConfig) -> int:
    from rlfleet.deploy.app.trainer import Trainer, evaluate_checkpoint

    if args.command == "demo":
        from rlfleet.deploy.app.demo import print_summary, run_demo
        from rlfleet.deploy.app.preflight import check_inputs

        check_inputs(cfg)
        if args.agent:
            from rlfleet.deploy.app.agent_demo import print_agent_summary, run_agent_demo

            print_agent_summary(run_agent_demo(cfg))
        else:
            print_summary(run_demo(cfg, rlhf=args.rlhf))
        return 0
    if args.command == "train":
        summary = Trainer(cfg).fit()
    elif args.command in ("sft", "rm", "dpo"):
        from rlfleet.deploy.app.stages import run_stage

        summary = run_stage(cfg, args.command)
    else:
        summary = evaluate_checkpoint(cfg, args.checkpoint)
    sys.stdout.write(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


def _plan(args: argparse.Namespace, cfg: RunConfig) -> int:
    from rlfleet.deploy.app.plan import format_plan, gpu_bytes_of, make_plan, parse_bytes

    try:
        plan = make_plan(cfg, gpu_bytes_of(cfg, parse_bytes(args.gpu_memory) if args.gpu_memory else None))
    except (ConfigError, ValueError) as err:
        sys.stderr.write(f"rlfleet: {err}\n")
        return ConfigError.exit_code
    sys.stdout.write(format_plan(plan) + "\n")
    return ConfigError.exit_code if plan.problems else 0


def _submit(args: argparse.Namespace, path: str, overrides: list[str]) -> int:
    from rlfleet.deploy.app import submit

    job = submit.submit(path, overrides, args.address, args.working_dir)
    sys.stdout.write(f"{job}\n")
    sys.stdout.flush()
    if not args.wait:
        return 0
    status = submit.wait(job, args.address)
    sys.stdout.write(f"{job} {status}\n")
    return 0 if status == "SUCCEEDED" else 1


def _scale(args: argparse.Namespace) -> int:
    from rlfleet.deploy.app import submit

    if args.rollout_workers < 1:
        sys.stderr.write(f"rlfleet: --rollout-workers must be >= 1 (got {args.rollout_workers})\n")
        return ConfigError.exit_code
    try:
        status = submit.scale(args.job, args.rollout_workers, args.address, args.wait_s)
    except (LookupError, ValueError) as err:
        sys.stderr.write(f"rlfleet: {err}\n")
        return ConfigError.exit_code
    sys.stdout.write(json.dumps({"job": args.job, "requested_rollout_workers": args.rollout_workers,
                                 "last_step": status.step, "rollout_workers": status.rollout_workers,
                                 "applies": "at the next step boundary"}) + "\n")
    return 0


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1 (got {text!r})")
    return int(text)


def _tiny_model(args: argparse.Namespace) -> int:
    from rlfleet.common.config import TinyModelConfig
    from rlfleet.common.tiny_models import build_tiny_causal_lm, build_tiny_reward_model

    build = build_tiny_reward_model if args.reward else build_tiny_causal_lm
    shape = TinyModelConfig() if args.layers is None else TinyModelConfig(num_layers=args.layers)
    sys.stdout.write(f"{build(args.out, seed=args.seed, shape=shape)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

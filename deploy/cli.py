"""The `rlfleet` command line.

    rlfleet demo [CONFIG] [key.path=value ...]     the built-in end-to-end job
    rlfleet train CONFIG [key.path=value ...]      train; resumes from the newest checkpoint
    rlfleet eval CONFIG --checkpoint DIR [key.path=value ...]
                                                   score a checkpoint's greedy answers
    rlfleet config check CONFIG [key.path=value ...]   validate; print the resolved YAML
    rlfleet config schema                          the JSON schema of the config
    rlfleet tiny-model OUT [--reward] [--seed N]   build a tiny model folder

Bad configuration exits with code 2 and a message naming each field at fault.
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

    demo = sub.add_parser("demo", help="run the built-in end-to-end job on the tiny model")
    _config_args(demo, required=False)
    demo.add_argument("--out", default=None, help="folder for the demo's files (default: a temp dir)")

    train = sub.add_parser("train", help="train (resumes from the run folder's newest checkpoint)")
    _config_args(train, required=True)

    evaluate = sub.add_parser("eval", help="score a checkpoint's greedy answers on the eval prompts")
    _config_args(evaluate, required=True)
    evaluate.add_argument("--checkpoint", required=True,
                          help="a checkpoint folder (run_dir/checkpoints/step_N) or an HF model folder")

    config = sub.add_parser("config", help="check a config or print its schema")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _config_args(config_sub.add_parser("check", help="validate and print the resolved YAML"), required=True)
    config_sub.add_parser("schema", help="print the JSON schema of RunConfig")

    tiny = sub.add_parser("tiny-model", help="build a tiny model (and tokenizer) folder")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--reward", action="store_true", help="a reward model instead of a causal LM")
    tiny.add_argument("--seed", type=int, default=0)
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
        path, overrides = _split_config_arg(args)
        cfg = load_config(path, overrides)
    except ConfigError as err:
        sys.stderr.write(f"rlfleet: {err}\n")
        return ConfigError.exit_code
    if args.command == "config":
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.command in ("train", "eval"):
        return _run(args, cfg)
    from rlfleet.deploy import smoke

    return smoke.main(cfg, args.out)


def _run(args: argparse.Namespace, cfg: RunConfig) -> int:
    import logging

    from rlfleet.deploy.trainer import Trainer, evaluate_checkpoint

    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "train":
        summary = Trainer(cfg).fit()
    else:
        summary = evaluate_checkpoint(cfg, args.checkpoint)
    sys.stdout.write(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from rlfleet.common.tiny_models import build_tiny_causal_lm, build_tiny_reward_model

    build = build_tiny_reward_model if args.reward else build_tiny_causal_lm
    sys.stdout.write(f"{build(args.out, seed=args.seed)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

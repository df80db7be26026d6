"""The entry point of a Ray job: `python -m rlfleet.deploy.app.job CONFIG [key.path=value ...]`.

    ray job submit --runtime-env deploy/cluster/runtime_env.yaml --working-dir . -- \
        python -m rlfleet.deploy.app.job examples/grpo_tiny.yaml total_steps=2

The same as `rlfleet train` (same exit codes: 2 for a bad config, bad data or reward code that
cannot score; 3 for a run that cannot learn: the job ends FAILED with the message), run as the
job's driver: it joins the job's cluster (RAY_ADDRESS) and starts the run's control actor
under the job's submission id, so `rlfleet scale <submission id> --rollout-workers K` reaches
it. The config path is relative to the job's working directory; `logging.run_dir` must be
storage every node shares (the working directory is a per-job temporary copy).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rlfleet.deploy.app import cli


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        sys.stderr.write("usage: python -m rlfleet.deploy.app.job CONFIG [key.path=value ...]\n")
        return 2
    return cli.main(["train", *args])


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pdmesh.parallel.rank_main``: a rank that an instance's leader starts on its own host.

Every setting comes from the environment (``PDMESH_WORKER_*``, rank and rendezvous included, see
``pdmesh.parallel.launch``); the rank serves as a follower until its leader ends the group. The
leader itself, and every rank started by a supervisor, run the worker service (``services.worker``).
"""

from __future__ import annotations

import argparse
import sys

from pdmesh.config import WorkerConfig
from pdmesh.logs import setup_logging
from pdmesh.parallel.instance import plan_instance
from pdmesh.parallel.rank_engine import run_follower
from pdmesh.security import tls
from pdmesh.settings_cli import add_config_flags, config_from_flags


def main() -> int:
    parser = argparse.ArgumentParser(prog="pdmesh rank", description="a follower rank of a pdmesh worker")
    add_config_flags(parser, WorkerConfig)
    args = parser.parse_args([])  # the leader passes everything through the environment
    setup_logging(args.log_level)
    config = config_from_flags(parser, WorkerConfig, args)
    try:
        tls.configure(tls.files_from(config))
        plan = plan_instance(config)
        if plan.spec.rank == 0:
            raise ValueError(
                "rank 0 is the instance's leader: start it as a worker (python -m services.worker)"
            )
        return run_follower(config, plan)
    except (OSError, ValueError) as exc:
        print(f"pdmesh worker: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m services.worker --role prefill|decode|mixed``: the worker service.

Flags over the environment (``PDMESH_WORKER_*``); the role it starts with can flip in place later
(the controller's ``SetRole``)."""

import sys

from services.worker.main import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1:]))

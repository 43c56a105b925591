"""``python -m pdmesh.worker``: a worker whose settings all come from the environment
(``PDMESH_WORKER_*``); how an instance's leader starts its other ranks on its host."""

import sys

from pdmesh.worker.main import run_worker

if __name__ == "__main__":
    sys.exit(run_worker([]))

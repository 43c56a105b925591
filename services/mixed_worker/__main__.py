"""`python -m services.mixed_worker`: run a mixed (colocated) worker."""

import sys

from services.worker.main import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(role="mixed"))

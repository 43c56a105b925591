"""`python -m services.prefill_worker`: run a prefill worker."""

import sys

from services.worker.main import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(role="prefill"))

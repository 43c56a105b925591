"""`python -m services.decode_worker`: run a decode worker."""

import sys

from services.worker.main import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(role="decode"))

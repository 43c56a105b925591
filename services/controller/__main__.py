"""`python -m services.controller`."""

import sys

from services.controller.main import main

if __name__ == "__main__":
    sys.exit(main())

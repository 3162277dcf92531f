"""``python -m rfq ...``: see rfq/cli/main.py."""

import sys

from rfq.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m camelid``: the ``camelid`` command."""

import sys

from camelid.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m camelid.cli`` (as torchrun runs it: ``torchrun ... -m camelid.cli train``)."""

import sys

from camelid.cli import main

if __name__ == "__main__":
    sys.exit(main())

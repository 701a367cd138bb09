"""``python -m agi_monai``: the ``agi-monai`` command line (see :mod:`agi_monai.cli`)."""

import sys

from agi_monai.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m agi_monai.deploy``: the MONAI Deploy synthesis application."""

import sys

from agi_monai.deploy.app import main

sys.exit(main())

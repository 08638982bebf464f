"""``python -m connic``."""

import sys

from connic.cli import main

sys.exit(main())

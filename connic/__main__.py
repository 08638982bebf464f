"""``python -m connic``."""

import sys

try:
    from connic.cli import main
except KeyboardInterrupt:  # Ctrl+C while connic itself is imported: as connic.cli.main says it
    sys.exit(130)

sys.exit(main())

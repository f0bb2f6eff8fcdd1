"""``python -m lungs_utils`` is the ``lungs`` command."""

import sys

from .app.cli import main

sys.exit(main())

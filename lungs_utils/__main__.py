"""``python -m lungs_utils`` is the ``lungs`` command."""

import sys

from .cli import main

sys.exit(main())

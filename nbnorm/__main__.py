"""``python -m nbnorm``: self-check against the reference and the timing table."""

import sys

from .bench import main

sys.exit(main())

"""``python -m patchcore_dist.cli`` is the ``patchcore`` command."""
import sys

from . import main

sys.exit(main())

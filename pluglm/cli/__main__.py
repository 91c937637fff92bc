"""``python -m pluglm.cli ...``: the ``pluglm`` console script without installing it."""
import sys

from . import main

sys.exit(main())

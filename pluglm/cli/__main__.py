"""``python -m pluglm.cli ...``: the ``pluglm`` console script without installing it."""
import sys

from . import main

# guarded: ``bench --quality --jobs N`` starts spawn workers, which import this module as
# ``__mp_main__`` and must not run the command again
if __name__ == "__main__":
    sys.exit(main())

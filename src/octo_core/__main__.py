"""``python -m octo_core``: the ``octo`` command."""
import sys

from octo_core.cli import main

if __name__ == "__main__":
    sys.exit(main())

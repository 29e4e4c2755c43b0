"""`tinygraft ...` and `python -m tinygraft ...`: the command line lives in tinygraft/cli/."""

import sys

from tinygraft.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

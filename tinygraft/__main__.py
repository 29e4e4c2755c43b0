"""`tinygraft ...` and `python -m tinygraft ...`: the command line lives in tinygraft/train/cli.py."""

import sys

from tinygraft.train.cli import main

if __name__ == "__main__":
    sys.exit(main())

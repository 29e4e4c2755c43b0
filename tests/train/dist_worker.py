"""torchrun's entry in the distributed tests: `tinygraft ARGS`, except that rank 1 alone reads a --train file that
does not exist (a bad input one process meets and the others do not: a file missing on one machine)."""

import os
import sys

from tinygraft.cli.main import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if os.environ.get("RANK") == "1" and "--train" in argv:
        argv[argv.index("--train") + 1] = "missing-on-rank-1.tsv"
    sys.exit(main(argv))

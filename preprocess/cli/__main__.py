"""``python -m preprocess.cli ...``: the same tool as ``dm-preprocess``."""

import sys

from preprocess.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

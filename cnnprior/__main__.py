"""`python -m cnnprior ...`: the `cnnprior` command."""

import sys

from cnnprior.cli import main

if __name__ == "__main__":
    sys.exit(main())

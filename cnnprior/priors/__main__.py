"""`python -m cnnprior.priors`: inspect, verify or convert prior files (see --help)."""

import sys

from cnnprior.priors.cli import main

if __name__ == "__main__":
    sys.exit(main())

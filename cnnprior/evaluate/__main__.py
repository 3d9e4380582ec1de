"""`python -m cnnprior.evaluate --config configs/eval_fashion.yaml`: write an evaluation report."""

import sys

from cnnprior.evaluate.run import main

if __name__ == "__main__":
    sys.exit(main())

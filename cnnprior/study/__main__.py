"""`python -m cnnprior.study --config configs/study_fashion.yaml`: run a study."""

import sys

from cnnprior.study.run import main

if __name__ == "__main__":
    sys.exit(main())

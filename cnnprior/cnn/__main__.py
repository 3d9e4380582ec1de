"""`python -m cnnprior.cnn import ...`: make a project CNN checkpoint from a torchvision state_dict."""

import sys

from cnnprior.cnn.importer import main

if __name__ == "__main__":
    sys.exit(main())

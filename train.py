#!/usr/bin/env python
"""Run the cnnprior pipeline from a config: classifier -> priors -> gan."""

from __future__ import annotations

import sys

from cnnprior.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())

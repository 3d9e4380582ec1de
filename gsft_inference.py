#!/usr/bin/env python
"""Run a trained GSFT generator on a prior file or on images and write a run folder (see --help)."""

from __future__ import annotations

import sys

from cnnprior.explain.inference import main

if __name__ == "__main__":
    sys.exit(main(variant="gsft"))

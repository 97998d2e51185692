#!/usr/bin/env python
"""Corpus -> Megatron indexed dataset; the same as ``megapatch preprocess`` (see its --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapatch.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

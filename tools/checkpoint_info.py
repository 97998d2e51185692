#!/usr/bin/env python
"""What a checkpoint is (step, stage, tokens, layout, config, parameters); ``megapatch ckpt info``.

python tools/checkpoint_info.py RUN/checkpoints            # the latest checkpoint
python tools/checkpoint_info.py RUN/checkpoints/iter_0000100 --json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ckpt", "info", *sys.argv[1:]]))

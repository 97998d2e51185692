#!/usr/bin/env python
"""Checkpoint conversion; the same as ``megapatch convert`` (see its --help).

    python tools/convert_checkpoint.py export --load RUN/checkpoints --save hf/my-model
    python tools/convert_checkpoint.py import --load hf/Llama-2-7b-hf --save ckpt/llama2 \\
        --tensor-model-parallel-size 2
    python tools/convert_checkpoint.py reshard --load ckpt/llama2 --save ckpt/llama2-tp4 \\
        --tensor-model-parallel-size 4
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapatch.cli import main  # noqa: E402

if __name__ == "__main__":  # required: megatron's checkpoint writer starts helper processes
    sys.exit(main(["convert", *sys.argv[1:]]))

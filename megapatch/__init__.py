"""megapatch: patch-level training for GPT models on Megatron-Core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core announces its fallbacks at import time on machines without Transformer Engine
# or apex (CPU development); megapatch reports what it resolved instead (see model/specs.py).
for _msg in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
):
    _warnings.filterwarnings("ignore", message=_msg)

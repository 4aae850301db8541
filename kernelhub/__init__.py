"""kernelhub: Triton kernels for LLM inference, tuned per GPU, with a config database.

Public entry points: `kernelhub.ops` (the kernels), the `kernelhub` command line, and
`kernelhub.kernels.loader` (the families).
"""

import os

__version__ = "0.1.0"

# Without a GPU the Triton kernels run in Triton's interpreter. Triton decides at import time
# whether its own library functions (tl.cdiv, tl.max, ...) are interpreted, so the switch must be
# set before anything imports triton; kernelhub.backend checks that it was.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

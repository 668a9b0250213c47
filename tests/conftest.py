"""Shared test set-up.

Triton kernels run under Triton's CPU interpreter when no GPU is present, so
the normal (CPU) suite holds every kernel to its reference. The interpreter is
chosen by an environment variable that Triton reads when it is first imported,
so it must be set here, before any test module imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Kernel tests run on a CUDA device when there is one, else in Triton's interpreter on the CPU.

`@triton.jit` decides at decoration time whether to interpret, so TRITON_INTERPRET must be set before the
kernel modules are imported: here, before pytest imports the test modules of this folder.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

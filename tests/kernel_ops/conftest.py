"""Kernel tests run on CPU through the Triton interpreter when no GPU is present.

@triton.jit reads TRITON_INTERPRET when it decorates a kernel, and autoquant.kernels decorates its
kernels on first launch (not on import), so setting the variable here, before any test launches a
kernel, is enough even when another test package imported autoquant.kernels first. On a machine
with CUDA it is left alone and the kernels run compiled on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

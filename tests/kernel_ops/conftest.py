"""Kernel tests run on CPU through the Triton interpreter when no GPU is present.

The switch (TRITON_INTERPRET=1 without CUDA) is set in the suite's root conftest, tests/conftest.py,
at its import: Triton decides between interpreter and compiler for its own language library once, at
the process's first ``import triton``, and the root conftest's session start imports triton before
this directory is collected, so setting it here would be too late in a whole-suite run (every CPU
kernel test would fail; kernels/_interpreter.py says so). It is set in that one place only. On a
machine with CUDA it is left alone and the kernels run compiled on the GPU.
"""

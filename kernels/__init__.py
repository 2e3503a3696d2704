"""flowopd kernels: Triton ops, one per file, each with its PyTorch reference beside it.

Kernels know nothing about the engine. Never touch CUDA at import time: the package must import on CPU.
(A PyPI package named `kernels` exists; this is not it.)
"""

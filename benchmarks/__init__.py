"""Kernel, training and generation benchmarks (pytest-benchmark), and the GPU suite."""

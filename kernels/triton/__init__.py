"""Our Triton kernels: one file per kernel (forward, backward, autograd wrapper, custom op)."""

"""One module per op: Triton kernels, host launchers, the torch custom op and its registry entries."""

"""Numerical kernels: int4 packing, affine quantization, FP8 block dequantization.

Each function here is the slow, obviously-correct reference; a faster device path, where one
exists, sits beside it and is tested against it.
"""

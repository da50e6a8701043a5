"""Pallas Mosaic GPU kernels: peer-write all-reduce and fused communication kernels."""

"""Triton kernels of ztriton, installed as `ztriton.kernels`; each op has a plain-torch reference beside it."""

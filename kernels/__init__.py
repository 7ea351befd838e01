"""Triton kernels for WaterSICLinear, installed as ``watersic_hf.kernels``.

Only relative imports inside this folder: the top-level name ``kernels`` belongs to Hugging
Face's Kernel Hub distribution and must never be imported or installed from here.
"""

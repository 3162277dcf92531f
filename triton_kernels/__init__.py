"""Triton kernels of rfq, installed as ``rfq.triton_kernels``.

A top-level ``triton_kernels`` name would clash with Triton's own package, hence the mapping in
setup.py. The GPU kernels and their launchers arrive with the CUDA/Triton issue; importing this
package never imports triton, so CPU-only installs stay light.
"""

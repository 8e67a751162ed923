"""Triton kernels of the DICE chain (``dicekern.kernels``); none yet, the torch engine runs everything.

Installed inside the package: the repository's top-level ``kernels/`` imports as
``dicekern.kernels``, never as a generic top-level ``kernels``.
"""

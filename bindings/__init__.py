"""Launchers and dispatch between the Triton kernels and the torch engine (``dicekern.bindings``).

Installed inside the package: the repository's top-level ``bindings/`` imports as
``dicekern.bindings``, never as a generic top-level ``bindings``.
"""

from dicekern.bindings.dispatch import BACKENDS, kernels_cover, resolve_backend

__all__ = ["BACKENDS", "kernels_cover", "resolve_backend"]

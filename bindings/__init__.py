"""Launchers of the Triton kernels (``dicekern.bindings``): shape, dtype and device checks, output
buffers, ``torch.library`` registrations.

Installed inside the package: the repository's top-level ``bindings/`` imports as
``dicekern.bindings``, never as a generic top-level ``bindings``. May import: ``dicekern.kernels``
and ``dicekern.core`` only; which models the kernels cover is ``dicekern.curvature.triton``'s question.
"""

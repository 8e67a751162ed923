"""Triton kernels of the DICE chain (``dicekern.kernels``): gossip mixing (``gossip_mix.py``) and the
MLP passes and one-launch chains (``mlp.py``), with the integer codes they take (``codes.py``).

Installed inside the package: the repository's top-level ``kernels/`` imports as
``dicekern.kernels``, never as a generic top-level ``kernels``. May import: triton and the
kernels' own integer codes (``codes``), nothing else of dicekern.
"""

"""Curvature engines: the losses of one architecture at many parameter vectors at once.

``torch_func.NodeObjective`` is the general reference (any model, torch.func); ``closed_form``
writes MLPs under the ``dk.losses`` losses as batched tensor algebra; the Triton kernels live in
``dicekern.bindings``. Every engine gives the same interface: node and test gradients, curvature
products and per-sample dots.
"""

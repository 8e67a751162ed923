"""Level 1: all nodes' models as functions of their stacked params, and the backends that compute them.

Owns the curvature-backend protocol (``protocol.CurvatureBackend``, with each backend's declared
``Capabilities``), its three implementations (``torch_func``: any model, the reference;
``closed_form``: MLPs as batched matmuls; ``triton``: MLPs by the kernels), the choice between them
(``protocol.select_backend``), and the plain round every node runs (``round``: optimizer step plus
gossip), which the recorder's replay check and the ground truth replay.

May import: ``dicekern.core``, ``dicekern.bindings`` (lazily, for the Triton backend).
"""

"""Level 2: recording a run and keeping it: ``Recorder``, ``Trajectory``, a round's record and its
checks (``rounds``), crash-safe storage (``storage``), how a saved run rebuilds its model
(``description``) and adapters from other trainers' conventions (``adapters``).

May import: ``dicekern.core``, ``dicekern.curvature``.
"""

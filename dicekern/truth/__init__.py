"""Level 4: ground truth by exact replay (``ground_truth``: ``dice_gt``, ``dice_gt_samples``) and
the paper's walk-by-walk evaluation (``walks``), both for validating the engine.

May import: ``core``, ``curvature``, ``record``, ``engine``.
"""

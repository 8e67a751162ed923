"""Level 3: DICE-E. Options, the query plan, the chain's linear operators, the chain, and the
public queries (``dice_e``, ``cascade``, ``influence_matrix``), last-layer mode and the ledger.

``plan.plan_query`` is the one place that inspects a run, its device and the options; it builds a
``QueryPlan`` that every query executes. The chain only composes operators (``operators``): a
hop is ``Mix @ J`` (the step Jacobian at the sender, then the mix), and its adjoint comes from the
operator algebra.

May import: ``dicekern.core``, ``dicekern.curvature``, ``dicekern.record``, ``dicekern.bindings``
(lazily, for the one-launch chains). Never ``truth``, ``apps`` or ``distributed``.
"""

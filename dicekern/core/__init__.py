"""Level 0, the ground floor: input checks, optional extras, atomic files, losses, the flat
parameter layout, optimizer specs and topologies.

May import: torch, numpy, the standard library. Nothing else of dicekern.
"""

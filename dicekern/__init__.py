"""dicekern: DICE, data influence cascades in decentralized (gossip) learning.

    >>> import dicekern as dk
    >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
    >>> scores = dk.dice_e(run.trajectory, step=0, test=run.test, hops=2)   # (N, B)
    >>> tuple(scores.shape)
    (4, 5)
"""

from dicekern import adapters, analysis, baselines, examples, losses, optim, plots, reference, topology
from dicekern.description import RunDescription, rebuildable
from dicekern.engine.options import DiceOptions
from dicekern.ground_truth import dice_gt, dice_gt_samples
from dicekern.influence import cascade, dice_e, influence_matrix
from dicekern.online import OnlineDICE
from dicekern.restrict import PerNodeTest, last_layer
from dicekern.rounds import Round
from dicekern.trajectory import Recorder, Trajectory, VerifyReport

__all__ = [
    "DiceOptions",
    "OnlineDICE",
    "PerNodeTest",
    "Recorder",
    "Round",
    "RunDescription",
    "Trajectory",
    "VerifyReport",
    "adapters",
    "analysis",
    "baselines",
    "cascade",
    "dice_e",
    "dice_gt",
    "dice_gt_samples",
    "examples",
    "influence_matrix",
    "last_layer",
    "losses",
    "optim",
    "plots",
    "rebuildable",
    "reference",
    "topology",
]

"""Level 5: DICE across processes with torch.distributed, each rank holding a block of the nodes.

The engine sees a rank's share as one ``dicekern.engine.partition.Partition`` and never imports
torch.distributed; this package builds that partition (``ranks``) and holds an example trainer
(``torchrun``: ``torchrun --nproc-per-node 4 -m dicekern.apps.torchrun``).

May import: every level below ``apps`` (``core`` to ``truth``), and ``apps.examples`` in the
example trainer.
"""

from dicekern.distributed.ranks import BlockMixer, DistributedOnlineDICE, DistributedRecorder, cascade, dice_e, final_influence, node_block

__all__ = ["BlockMixer", "DistributedOnlineDICE", "DistributedRecorder", "cascade", "dice_e", "final_influence", "node_block"]

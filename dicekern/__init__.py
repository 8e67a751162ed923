"""dicekern: DICE, data influence cascades in decentralized (gossip) learning.

    >>> import dicekern as dk
    >>> run = dk.examples.digits_run(num_nodes=4, rounds=3, batch_size=5)
    >>> scores = dk.dice_e(run.trajectory, step=0, test=run.test, hops=2)   # (N, B)
    >>> tuple(scores.shape)
    (4, 5)

Glossary (one name per concept, used in every module):

* **node** k: one participant of the gossip run, N of them; it trains on its own **batch** of B
  **samples** each round.
* **round** t: every node's local optimizer step on its batch, then the **mix** (gossip) with the
  mixing matrix W^t (W[k, j]: the weight receiver k gives node j; rows sum to 1).
* **params**: every node's parameters stacked on a leading node axis: a name -> (N, *shape) dict
  at the API's edge, flat (N, D) inside. theta is one node's (D,).
* **node state**: a node's params plus its optimizer's **state blocks** (momentum, Adam moments),
  S blocks in all; stacked, an (N, S, D) tensor.
* **hop** s: s rounds after the scored round t; hop s reads the params of round t + s. A query's
  **window** is the rounds t..t+hops.
* **source** j: the node whose samples are removed; **receiver** k: a node whose test loss changes.
* **column**: one of C chain vectors carried side by side, (N, C, S, D): a source (forward) or a
  test objective (adjoint).
* **perturbation** delta: the change of every node's state that removing samples causes (forward);
  its **adjoint** lambda carries a test objective back to the samples.
* **backend**: what computes gradients and curvature products of all nodes
  (``dicekern.curvature``); a run's ``traj.objective`` is its torch.func reference backend, the
  engine's steps and test sets hold the backend a query runs on. A **query plan** fixes the window,
  options, backend, partition and chunking of one query (``dicekern.engine.plan``).
* **partition**: the nodes one process holds and how its mixes exchange rows (``dicekern.core.partition``).

Layout: ``core`` and ``kernels`` (0) <- ``bindings`` (1) <- ``curvature`` (2) <- ``record`` (3) <-
``engine``, ``zoo`` (4) <- ``truth`` (5) <- ``distributed`` (6) <- ``apps`` (7); imports only point
down. README.md, "Layout", has the picture; tests/contracts/test_layout.py holds it.
"""


from dicekern import compat
from dicekern.apps import analysis, baselines, examples, plots
from dicekern.core import losses, optim, topology
from dicekern.record import adapters
from dicekern.truth import walks
from dicekern.record.description import RunDescription, rebuildable
from dicekern.engine.options import DiceOptions
from dicekern.engine.plan import QueryPlan, plan_query
from dicekern.truth.ground_truth import dice_gt, dice_gt_samples, final_gt
from dicekern.engine.queries import cascade, dice_e, final_influence, influence_matrix, node_contributions
from dicekern.engine.ledger import OnlineDICE
from dicekern.engine.last_layer import PerNodeTest, last_layer
from dicekern.record.modules import mix_, stack_buffers, stack_params
from dicekern.record.rounds import Round
from dicekern.record.trajectory import Recorder, Trajectory, VerifyReport
from dicekern import zoo

__all__ = [
    "DiceOptions",
    "OnlineDICE",
    "PerNodeTest",
    "QueryPlan",
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
    "final_gt",
    "final_influence",
    "influence_matrix",
    "last_layer",
    "losses",
    "mix_",
    "node_contributions",
    "optim",
    "plan_query",
    "plots",
    "rebuildable",
    "stack_buffers",
    "stack_params",
    "topology",
    "walks",
    "zoo",
]

compat.install()


def __getattr__(name: str):
    if name == "reference":
        compat.warn_moved("dk.reference", "dk.walks")
        return walks
    raise AttributeError(f"module 'dicekern' has no attribute {name!r}")

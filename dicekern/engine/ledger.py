"""An online contribution ledger: score each round as soon as its hops are recorded, keep totals.

What the totals are: each round's DICE-E^(hops) scores, summed over the rounds. A round's score
follows its samples for ``hops`` rounds and reads the test loss of the models *then*; the total is
a sum of such windowed effects, not the effect of a node's data on the models the run ends with
(``dk.node_contributions`` and ``dk.final_influence`` answer that, from a recorded run). With
``final_contributions=True`` the ledger also carries the streaming form of that answer: the
linearised change of every node's state when each node's data is removed from every round so far
(the forward sweep of ``dicekern.engine.sweep``, N columns), read on the newest models each round.

Memory stays bounded by hops + 1 rounds whatever the run length (2 with final_contributions, plus
the N x N x S x D perturbation): rounds leave the recorder once scored, and each round's test
gradients are computed once and reused by every window that needs them. Checkpoints are crash-safe folders (``dicekern.core.snapshots``): a save is published whole or
not at all, and a load checks that every part belongs to the same save.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from dicekern.core.checks import as_tensor, check_flag, check_int, check_test
from dicekern.engine.plan import check_inputs, plan_query
from dicekern.engine.options import DiceOptions
from dicekern.engine.sweep import RunSweep
from dicekern.curvature.protocol import LossFn
from dicekern.core.optim import spec_from_dict
from dicekern.core.snapshots import make_folder, open_snapshot, parse_json_object, publish, read_file, write_file
from dicekern.record.storage import MANIFEST, read_run, write_run
from dicekern.record.trajectory import Recorder, Trajectory

LEDGER = "ledger.json"
TEST_GRADS = "test_grads.safetensors"
PERTURBATION = "perturbation.safetensors"
PENDING = "pending"
LEDGER_VERSION = 5  # 5 added final_contributions (older: off), 4 mix_buffers (older: False), 3 round_totals (version 2: empty)
READABLE_LEDGER_VERSIONS = (2, 3, 4, 5)


@dataclass
class LedgerState:
    """Everything a ledger has accumulated; :meth:`OnlineDICE.save` and :meth:`OnlineDICE.load`
    round-trip it whole.

    Attributes:
        scored_steps: the rounds folded in, in order.
        node_totals: (N,) summed over the scored rounds; None before the first.
        round_totals: scored round -> (N,) that round's share of node_totals.
        matrix_totals: (N_source, N_receiver) summed over the scored rounds, when the ledger keeps
            the node matrix and has scored a round; else None.
        sample_totals: sample id -> total over the scored rounds.
        sample_ids: recorded, not yet scored round -> (N, B) ids of its samples.
        test_grads: recorded round -> (N, D) q-scaled test gradients, kept until no window needs them.
        final_totals: (N,) with final_contributions: each node's data (every round so far) on the
            q-weighted test loss of the newest recorded models; else None.
        perturbation: (N, N_source, S, D) with final_contributions, once two rounds are recorded:
            the linearised change of every node's state at the newest round when each source's
            data is removed from every round before it; else None.
    """

    scored_steps: list[int] = field(default_factory=list)
    node_totals: torch.Tensor | None = None
    round_totals: dict[int, torch.Tensor] = field(default_factory=dict)
    matrix_totals: torch.Tensor | None = None
    sample_totals: dict[int, float] = field(default_factory=dict)
    sample_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    test_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    final_totals: torch.Tensor | None = None
    perturbation: torch.Tensor | None = None

    def fold(self, t: int, round_totals: torch.Tensor, matrix: torch.Tensor | None, sample_totals: dict[int, float]) -> None:
        """Add round t's (N,) totals, (N, N) matrix (or None) and its samples' updated totals."""
        self.node_totals = round_totals if self.node_totals is None else self.node_totals + round_totals
        self.round_totals[t] = round_totals
        if matrix is not None:
            self.matrix_totals = matrix if self.matrix_totals is None else self.matrix_totals + matrix
        self.sample_totals.update(sample_totals)
        self.sample_ids.pop(t, None)
        self.scored_steps.append(t)
        for old in [s for s in self.test_grads if s <= t]:  # no later window reaches back to t
            del self.test_grads[old]

    def to_json(self) -> dict:
        """The JSON fields of the ledger file (test_grads are saved beside it as tensors)."""
        listed = lambda tensor: None if tensor is None else tensor.tolist()
        return {
            "scored_steps": self.scored_steps,
            "node_totals": listed(self.node_totals),
            "round_totals": {str(t): totals.tolist() for t, totals in self.round_totals.items()},
            "matrix_totals": listed(self.matrix_totals),
            "sample_totals": {str(k): v for k, v in self.sample_totals.items()},
            "sample_ids": {str(s): ids.tolist() for s, ids in self.sample_ids.items()},
            "final_totals": listed(self.final_totals),
        }

    @classmethod
    def from_json(cls, saved: dict, test_grads: dict[int, torch.Tensor], like: torch.Tensor | None,
                  perturbation: torch.Tensor | None = None) -> LedgerState:
        """The state :meth:`to_json` wrote (fields already type-checked), totals as like's dtype and
        device; test_grads and perturbation as read beside it."""
        tensor = lambda values: None if values is None else torch.tensor(values, dtype=like.dtype, device=like.device)
        return cls(
            scored_steps=saved["scored_steps"],
            node_totals=tensor(saved["node_totals"]),
            round_totals={int(t): tensor(totals) for t, totals in saved["round_totals"].items()},
            matrix_totals=tensor(saved["matrix_totals"]),
            sample_totals={int(k): v for k, v in saved["sample_totals"].items()},
            sample_ids={int(s): torch.tensor(ids) for s, ids in saved["sample_ids"].items()},
            test_grads=test_grads,
            final_totals=tensor(saved["final_totals"]),
            perturbation=perturbation,
        )


def test_digest(test: object) -> str:
    """sha256 of a test set (inputs, targets) as given: shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, part in zip(("inputs", "targets"), test):
        tensor = as_tensor(f"test {name}", part).detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class OnlineDICE:
    """Records a run like :class:`Recorder` and keeps DICE-E totals of every node and sample.

    Args:
        model, loss_fn, optimizer, mix_state, mix_buffers, replay_check: as for Recorder (None: its default).
        test: (inputs (M, ...), targets (M, ...)), the objective every round is scored against.
        hops: DICE-E^(hops) of each round; round t is scored when round t + hops is recorded.
        node_matrix: also accumulate the (N_source, N_receiver) node influence matrix, summed over hops.
        final_contributions: also keep ``final_totals``, each node's data on the newest models (the
            streaming form of ``dk.node_contributions`` at options.order; one process only).
        recorder: an empty Recorder with window hops + 1 (at least 2 with final_contributions) to record into, built from the same
            model and loss; optimizer, mix_state, mix_buffers and replay_check are then the recorder's and
            may not be given. Default: a Recorder built from the arguments above. Its
            ``partition`` says which nodes this process scores (across processes use
            ``dicekern.distributed.DistributedOnlineDICE``, which brings its own recorder).
        options: a :class:`DiceOptions` (q, curvature, curvature_at, direct, backend), or its
            fields as keywords, as for :func:`dicekern.dice_e`.

    Attributes:
        state: the :class:`LedgerState`; its totals are also read as the properties below.
        node_totals: (N,) how much each node's data changed the q-weighted test loss over the scored
            rounds (negative: it helped). At order 2 these are whole batches' second-order terms
            (from the node matrix, N forward columns a round), no longer the sum of sample_totals.
        sample_totals: sample id -> total, for rounds recorded with ``sample_ids``.
        matrix_totals: (N, N) when node_matrix, else None.
        round_totals: scored round -> (N,) each node's share of that round alone, for
            ``dk.plots.contribution_over_rounds`` (node_totals is their sum).
        final_totals: (N,) with final_contributions, after each record(): the change of the
            q-weighted test loss of the models just recorded when each node's data is removed from
            every round before them; equal to ``dk.node_contributions`` of the run so far.
        scored_steps: the rounds folded in so far.

    Example:
        >>> import torch, dicekern as dk
        >>> run = dk.examples.digits_run(num_nodes=4, rounds=4, batch_size=3)
        >>> ledger = dk.OnlineDICE(run.model, run.loss_fn, run.test, hops=2)
        >>> for t in run.trajectory.steps:
        ...     r = run.trajectory[t]
        ...     _ = ledger.record(t, run.trajectory.params(t), r.inputs, r.targets, r.lr, r.W)
        >>> ledger.scored_steps
        [0, 1, 2]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        test: tuple[torch.Tensor, torch.Tensor],
        hops: int,
        *,
        optimizer: object = None,
        mix_state: bool | None = None,
        mix_buffers: bool | None = None,
        replay_check: str | None = None,
        node_matrix: bool = False,
        final_contributions: bool = False,
        recorder: Recorder | None = None,
        options: DiceOptions | None = None,
        **option_fields,
    ):
        self.hops = check_int("hops", hops, minimum=0)
        self.final_contributions = check_flag("final_contributions", final_contributions)
        self.options = DiceOptions.of(options, **option_fields)
        check_test(test, torch.empty(0))  # the structure now; dtype and device at the first round
        self.test = test
        self._test_digest = test_digest(test)
        self.node_matrix = check_flag("node_matrix", node_matrix)
        given = {name: value for name, value in (("optimizer", optimizer), ("mix_state", mix_state), ("mix_buffers", mix_buffers),
                                                 ("replay_check", replay_check)) if value is not None}
        window = max(self.hops + 1, 2) if self.final_contributions else self.hops + 1  # the carry reads the round before the newest
        if recorder is None:
            recorder = Recorder(model, loss_fn, window=window, **given)
        elif given:
            raise ValueError(f"with a recorder given, pass {' and '.join(given)} to the recorder, not to OnlineDICE")
        else:
            _check_recorder(recorder, model, loss_fn, window)
        self.recorder = recorder
        self.state = LedgerState()
        self._query_checked = False

    scored_steps = property(lambda self: self.state.scored_steps, doc="The rounds folded in so far.")
    node_totals = property(lambda self: self.state.node_totals, doc="(N,) totals over the scored rounds, or None.")
    round_totals = property(lambda self: self.state.round_totals, doc="Scored round -> (N,) its share of node_totals.")
    matrix_totals = property(lambda self: self.state.matrix_totals, doc="(N, N) totals when node_matrix, else None.")
    sample_totals = property(lambda self: self.state.sample_totals, doc="Sample id -> total over the scored rounds.")
    final_totals = property(lambda self: self.state.final_totals, doc="(N,) each node's data on the newest models, or None.")

    def record(
        self, step: int, params: Mapping[str, torch.Tensor] | Sequence[nn.Module], inputs=None, targets=None, lr=None, W=None, *,
        state=None, buffers=None, optimizers=None, sample_ids=None,
    ) -> torch.Tensor | None:
        """Record round ``step`` (arguments of Recorder.record); returns the (N, B) scores of round
        step - hops if that round became complete, else None.

        Rounds come one after another. A round that cannot be recorded or scored raises and leaves
        the ledger as it was, so the call can be corrected and retried.

        Args:
            sample_ids: (N, B) integer ids of the batch's samples, to total them across rounds.
        """
        step = check_int("step", step)
        recorded = self.recorder.trajectory().steps
        if recorded and step != recorded[-1] + 1:
            raise ValueError(f"the ledger scores consecutive rounds: expected round {recorded[-1] + 1}, got {step}")
        ids = None
        if sample_ids is not None:  # checked before anything is recorded
            ids = as_tensor("sample_ids", sample_ids)
            if inputs is None or ids.is_floating_point() or tuple(ids.shape) != tuple(inputs.shape[:2]):
                shape = "(N, B) of the batch" if inputs is None else f"(N, B) = {tuple(inputs.shape[:2])}"
                raise ValueError(f"sample_ids must be integer ids of shape {shape}")
        savepoint = self.recorder.savepoint()
        try:
            self.recorder.record(step, params, inputs, targets, lr, W, state=state, buffers=buffers, optimizers=optimizers)
            if ids is not None:
                self.state.sample_ids[step] = ids.cpu()
            traj = self.recorder.trajectory()
            self._check_query(traj)
            carried = self._carry(traj, step) if self.final_contributions else None
            scores = self._score(traj, step - self.hops)
            if carried is not None:
                self.state.perturbation, self.state.final_totals = carried
            return scores
        except BaseException:
            self.recorder.rollback(savepoint)
            self.state.sample_ids.pop(step, None)
            raise

    def _check_query(self, traj: Trajectory) -> None:
        """Check the test set (and q) against the first recorded batch, once."""
        if not self._query_checked and any(traj[s].has_batch for s in traj.steps):
            self.test = check_inputs(traj, self.test, self.options, self.recorder.partition)
            self._query_checked = True

    def _carry(self, traj: Trajectory, step: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The perturbation carried to round step through the round before it, and its reading on
        the models of round step: (N, N, S, D) or None at the first round, and (N,) final totals."""
        if step - 1 not in traj:
            return None, traj[step].params.new_zeros(traj.num_nodes)
        sweep = RunSweep(plan_query(traj, step - 1, self.test, 1, self.options, partition=self.recorder.partition))
        nodes = torch.arange(traj.num_nodes, device=traj.device)
        perturbation = sweep.advance(self.state.perturbation, step - 1, nodes, self.options.order)
        return perturbation, sweep.read(perturbation, self.options.order)

    def _score(self, traj, t: int) -> torch.Tensor | None:
        """Score round t if its window is complete; every total changes only once all is computed."""
        if any(s not in traj for s in range(t, t + self.hops + 1)) or not traj[t].has_batch or t in self.state.scored_steps:
            return None
        plan = plan_query(traj, t, self.test, self.hops, self.options, partition=self.recorder.partition)
        chain = plan.chain(test_grad_cache=self.state.test_grads)
        scores = chain.adjoint(per_hop=False)  # (N, B)
        whole = chain.influence_matrix().sum(0) if self.node_matrix or self.options.order == 2 else None  # (N_source, N_receiver)
        matrix = whole if self.node_matrix else None
        round_totals = whole.sum(1) if self.options.order == 2 else scores.sum(1)  # a batch's second order is not its samples' sum
        ids = self.state.sample_ids.get(t)
        by_id: dict[int, float] = {}
        if ids is not None:
            for sample_id, score in zip(ids.flatten().tolist(), scores.flatten().tolist()):
                by_id[sample_id] = by_id.get(sample_id, self.state.sample_totals.get(sample_id, 0.0)) + score
        self.state.fold(t, round_totals, matrix, by_id)
        return scores

    def save(self, directory: str | os.PathLike) -> None:
        """Publish the totals and what scoring the next rounds needs as the new checkpoint of
        directory, whole or not at all; resuming gives bitwise-identical totals."""
        traj = self.recorder.trajectory()
        grads = save_tensors({str(s): g.contiguous().cpu() for s, g in self.state.test_grads.items()})
        perturbation = None if self.state.perturbation is None else save_tensors({"perturbation": self.state.perturbation.contiguous().cpu()})

        def fill(folder: Path) -> str:
            checksums = {TEST_GRADS: hashlib.sha256(grads).hexdigest()}
            write_file(folder, TEST_GRADS, grads)
            if perturbation is not None:
                checksums[PERTURBATION] = hashlib.sha256(perturbation).hexdigest()
                write_file(folder, PERTURBATION, perturbation)
            if traj.steps:
                pending = make_folder(folder, PENDING)
                manifest = write_run(traj, pending)
                checksums[f"{PENDING}/{manifest}"] = hashlib.sha256(read_file(pending, (manifest,), 1 << 40)).hexdigest()
            write_file(folder, LEDGER, json.dumps(self._ledger(list(traj.steps), checksums)).encode())
            return LEDGER

        publish(directory, fill)

    def _ledger(self, pending: list[int], checksums: dict[str, str]) -> dict:
        q = self.options.q
        return {
            "version": LEDGER_VERSION,
            "hops": self.hops,
            "node_matrix": self.node_matrix,
            "final_contributions": self.final_contributions,
            "optimizer": self.recorder.optimizer.to_dict(),
            "mix_state": self.recorder.mix_state,
            "mix_buffers": self.recorder.mix_buffers,
            "replay_check": self.recorder.replay_check,
            "options": {name: value for name, value in self.options.to_dict().items() if name != "q"},  # q is saved on its own
            "q": None if q is None else q.double().tolist(),
            "test": self._test_digest,
            **self.state.to_json(),
            "pending": pending,
            "checksums": checksums,
        }

    @classmethod
    def load(
        cls, directory: str | os.PathLike, model: nn.Module, loss_fn: LossFn, test: tuple[torch.Tensor, torch.Tensor],
        *, q: torch.Tensor | None = None, device: torch.device | str = "cpu", **kwargs,
    ) -> OnlineDICE:
        """Resume the checkpoint published in directory by :meth:`save`.

        Pass the same model, loss and test set as before (a different test set raises); q
        defaults to the saved one and, if given, must equal it. Other constructor arguments
        (``recorder``; a subclass's own) come as keywords; a given recorder must have
        the saved optimizer, mix_state and replay_check.

        Raises:
            ValueError: nothing saved, or a checkpoint whose parts do not belong together, named.
        """
        directory = Path(directory)
        snapshot, data = open_snapshot(directory, what="OnlineDICE ledger", index=LEDGER)
        where = str(snapshot / LEDGER)
        state = _parse_ledger(data, where)
        if test_digest(test) != state["test"]:
            raise ValueError(f"{where}: the test set differs from the one this ledger was scoring; resume with the same test set")
        saved_q = None if state["q"] is None else torch.tensor(state["q"], dtype=torch.float64)
        if q is not None and (saved_q is None or not torch.equal(as_tensor("q", q).detach().cpu().double(), saved_q)):
            raise ValueError(f"{where}: q differs from the saved node weights {state['q']}; resume with the same q (or none)")
        recording = {"optimizer": spec_from_dict(state["optimizer"]), "mix_state": state["mix_state"], "mix_buffers": state["mix_buffers"],
                     "replay_check": state["replay_check"]}
        given_recorder = kwargs.get("recorder") is not None  # checked by the constructor, then against the saved recording
        ledger = cls(model, loss_fn, test, state["hops"], node_matrix=state["node_matrix"], final_contributions=state["final_contributions"], q=saved_q,
                     **({} if given_recorder else recording), **state["options"], **kwargs)
        differ = [name for name, value in recording.items() if getattr(ledger.recorder, name) != value]
        if differ:
            raise ValueError(f"{where}: the given recorder does not match the saved {' and '.join(differ)} ({recording})")
        like = None
        if state["pending"]:
            manifest = read_file(directory, (snapshot.name, PENDING, MANIFEST), 1 << 30)
            if hashlib.sha256(manifest).hexdigest() != state["checksums"].get(f"{PENDING}/{MANIFEST}"):
                raise ValueError(f"{snapshot / PENDING / MANIFEST} does not belong to {where}: its checksum differs")
            run = read_run(directory, (snapshot.name, PENDING), manifest, model, loss_fn, device, len(state["pending"]))
            pending = Trajectory.of_saved(run)
            if list(pending.steps) != state["pending"]:
                raise ValueError(f"{where}: pending rounds {state['pending']} differ from the saved rounds {list(pending.steps)}")
            for t in pending.steps:
                rnd = pending[t]
                batch = (rnd.inputs, rnd.targets, rnd.lr, rnd.W) if rnd.has_batch else ()
                ledger.recorder.record(t, pending.params(t), *batch, state=rnd.state)
            like = pending[pending.steps[0]].params
            ledger._check_query(pending)
        grads = read_file(directory, (snapshot.name, TEST_GRADS), 1 << 36)
        if hashlib.sha256(grads).hexdigest() != state["checksums"].get(TEST_GRADS):
            raise ValueError(f"{snapshot / TEST_GRADS} does not belong to {where}: its checksum differs")
        test_grads = {int(s): g.to(device) for s, g in load_tensors(grads).items()}
        perturbation = None
        if PERTURBATION in state["checksums"]:
            saved = read_file(directory, (snapshot.name, PERTURBATION), 1 << 40)
            if hashlib.sha256(saved).hexdigest() != state["checksums"][PERTURBATION]:
                raise ValueError(f"{snapshot / PERTURBATION} does not belong to {where}: its checksum differs")
            perturbation = load_tensors(saved)["perturbation"].to(device)
        if like is None and (test_grads or state["scored_steps"] or state["node_totals"] is not None or state["matrix_totals"] is not None
                             or perturbation is not None or state["final_totals"] is not None):
            raise ValueError(f"{where}: totals or test gradients without pending rounds")
        ledger.state = LedgerState.from_json(state, test_grads, like, perturbation)
        return ledger


def _check_recorder(recorder: Recorder, model: nn.Module, loss_fn: LossFn, window: int) -> None:
    """A recorder handed to OnlineDICE: empty, keeping the ledger's window of rounds, for the same model and loss."""
    if not isinstance(recorder, Recorder):
        raise TypeError(f"recorder must be a dicekern.Recorder, got {type(recorder).__name__}")
    if recorder.window != window:
        raise ValueError(f"the recorder must keep a window of {window} rounds (hops + 1, at least 2 with final_contributions), "
                         f"got window={recorder.window}")
    if recorder.trajectory().steps:
        raise ValueError("the recorder must be empty: the ledger scores every round it records")
    if recorder.objective.model is not model or recorder.objective.loss_fn is not loss_fn:
        raise ValueError("the recorder was built from another model or loss_fn than the one given to OnlineDICE")


def _parse_ledger(data: bytes, where: str) -> dict:
    """A ledger's fields, each checked for its type; a ValueError names the field otherwise."""
    state = parse_json_object(data, where)
    if state.get("version") not in READABLE_LEDGER_VERSIONS:
        raise ValueError(f"{where} is not an OnlineDICE ledger of version {' or '.join(map(str, READABLE_LEDGER_VERSIONS))}")
    if state["version"] == 2:
        state["round_totals"] = {}
    if state["version"] <= 3:
        state["mix_buffers"] = False
    if state["version"] <= 4:
        state["final_contributions"], state["final_totals"] = False, None
    kinds = {
        "hops": int, "node_matrix": bool, "final_contributions": bool, "final_totals": (list, type(None)), "optimizer": dict, "mix_state": bool, "mix_buffers": bool, "replay_check": str, "options": dict,
        "q": (list, type(None)), "test": str, "scored_steps": list, "node_totals": (list, type(None)), "round_totals": dict,
        "matrix_totals": (list, type(None)), "sample_totals": dict, "sample_ids": dict, "pending": list, "checksums": dict,
    }
    for name, kind in kinds.items():
        if name not in state or not isinstance(state[name], kind) or (isinstance(state[name], bool) and kind is int):
            raise ValueError(f"{where}: field {name!r} is missing or of the wrong type")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in state["scored_steps"] + state["pending"]):
        raise ValueError(f"{where}: fields 'scored_steps' and 'pending' must list round numbers")
    nodes = len(state["node_totals"] or [])
    for t, totals in state["round_totals"].items():
        if t not in map(str, state["scored_steps"]) or not isinstance(totals, list) or len(totals) != nodes:
            raise ValueError(f"{where}: field 'round_totals' must map scored rounds to {nodes} node totals, got round {t!r}")
    return state

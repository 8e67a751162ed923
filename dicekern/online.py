"""An online contribution ledger: score each round as soon as its hops are recorded, keep totals.

Memory stays bounded by hops + 1 rounds whatever the run length: rounds leave the recorder once
scored, and each round's test gradients are computed once and reused by every window that needs
them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dicekern.checks import as_tensor, check_int, check_test
from dicekern.engine.builder import build_chain
from dicekern.engine.chain import Chain
from dicekern.engine.options import DiceOptions
from dicekern.objective import LossFn
from dicekern.optim import spec_from_dict
from dicekern.storage import load_trajectory, save_trajectory
from dicekern.trajectory import Recorder

LEDGER = "ledger.json"


class OnlineDICE:
    """Records a run like :class:`Recorder` and keeps DICE-E totals of every node and sample.

    Args:
        model, loss_fn, optimizer, mix_state, replay_check: as for Recorder.
        test: (inputs (M, ...), targets (M, ...)), the objective every round is scored against.
        hops: DICE-E^(hops) of each round; round t is scored when round t + hops is recorded.
        node_matrix: also accumulate the (N_source, N_receiver) node influence matrix, summed over hops.
        options: a :class:`DiceOptions` (q, curvature, curvature_at, direct, backend), or its
            fields as keywords, as for :func:`dicekern.dice_e`.

    Attributes:
        node_totals: (N,) how much each node's data changed the q-weighted test loss over the scored
            rounds (negative: it helped).
        sample_totals: sample id -> total, for rounds recorded with ``sample_ids``.
        matrix_totals: (N, N) when node_matrix, else None.
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
        mix_state: bool = False,
        replay_check: str = "sampled",
        node_matrix: bool = False,
        options: DiceOptions | None = None,
        **option_fields,
    ):
        self.hops = check_int("hops", hops, minimum=0)
        self.recorder = self._make_recorder(model, loss_fn, optimizer=optimizer, mix_state=mix_state, replay_check=replay_check)
        self.test = test
        self.options = DiceOptions.of(options, **option_fields)
        self.node_matrix = bool(node_matrix)
        self.node_totals: torch.Tensor | None = None
        self.matrix_totals: torch.Tensor | None = None
        self.sample_totals: dict[int, float] = {}
        self.scored_steps: list[int] = []
        self._sample_ids: dict[int, torch.Tensor] = {}
        self._test_grads: dict[int, torch.Tensor] = {}  # step -> (N, D) q-scaled test gradients

    def record(
        self, step: int, params: Mapping[str, torch.Tensor], inputs=None, targets=None, lr=None, W=None, *, state=None, sample_ids=None
    ) -> torch.Tensor | None:
        """Record round ``step`` (arguments of Recorder.record); returns the (N, B) scores of round
        step - hops if that round became complete, else None.

        Args:
            sample_ids: (N, B) integer ids of the batch's samples, to total them across rounds.
        """
        ids = None
        if sample_ids is not None:  # checked before anything is recorded
            ids = as_tensor("sample_ids", sample_ids)
            if inputs is None or ids.is_floating_point() or tuple(ids.shape) != tuple(inputs.shape[:2]):
                shape = "(N, B) of the batch" if inputs is None else f"(N, B) = {tuple(inputs.shape[:2])}"
                raise ValueError(f"sample_ids must be integer ids of shape {shape}")
        self.recorder.record(step, params, inputs, targets, lr, W, state=state)
        if ids is not None:
            self._sample_ids[step] = ids.cpu()
        return self._score(step - self.hops)

    def _score(self, t: int) -> torch.Tensor | None:
        traj = self.recorder.trajectory()
        if any(s not in traj for s in range(t, t + self.hops + 1)) or not traj[t].has_batch or t in self.scored_steps:
            return None
        if self.node_totals is None:
            self.test = check_test(self.test, traj[t].params)
        chain = self._chain(traj, t)
        scores = chain.adjoint(per_hop=False)  # (N, B)
        self.node_totals = scores.sum(1) if self.node_totals is None else self.node_totals + scores.sum(1)
        if self.node_matrix:
            matrix = chain.influence_matrix().sum(0)
            self.matrix_totals = matrix if self.matrix_totals is None else self.matrix_totals + matrix
        ids = self._sample_ids.pop(t, None)
        if ids is not None:
            for sample_id, score in zip(ids.flatten().tolist(), scores.flatten().tolist()):
                self.sample_totals[sample_id] = self.sample_totals.get(sample_id, 0.0) + score
        self.scored_steps.append(t)
        for old in [s for s in self._test_grads if s <= t]:  # no later window reaches back to t
            del self._test_grads[old]
        return scores

    def _make_recorder(self, model: nn.Module, loss_fn: LossFn, **recorder_options) -> Recorder:
        return Recorder(model, loss_fn, window=self.hops + 1, **recorder_options)

    def _chain(self, traj, t: int) -> Chain:
        """The chain that scores round t, sharing this ledger's test-gradient cache."""
        return build_chain(traj, t, self.test, self.hops, self.options, test_grad_cache=self._test_grads)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the totals and what scoring the next rounds needs, to resume with identical totals."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        traj = self.recorder.trajectory()
        if traj.steps:
            save_trajectory(traj, directory / "pending")
        save_file({str(s): g.contiguous().cpu() for s, g in self._test_grads.items()}, directory / "test_grads.safetensors")
        state = {
            "hops": self.hops,
            "node_matrix": self.node_matrix,
            "optimizer": self.recorder.optimizer.to_dict(),
            "mix_state": self.recorder.mix_state,
            "replay_check": self.recorder.replay_check,
            "options": {f.name: getattr(self.options, f.name) for f in fields(self.options) if f.name != "q"},
            "scored_steps": self.scored_steps,
            "node_totals": None if self.node_totals is None else self.node_totals.tolist(),
            "matrix_totals": None if self.matrix_totals is None else self.matrix_totals.tolist(),
            "sample_totals": {str(k): v for k, v in self.sample_totals.items()},
            "sample_ids": {str(s): ids.tolist() for s, ids in self._sample_ids.items()},
            "pending": list(traj.steps),
        }
        tmp = directory / (LEDGER + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, directory / LEDGER)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, model: nn.Module, loss_fn: LossFn, test: tuple[torch.Tensor, torch.Tensor],
        *, q: torch.Tensor | None = None, device: torch.device | str = "cpu", **kwargs,
    ) -> OnlineDICE:
        """Resume a ledger saved by :meth:`save`; pass the same model, loss, test and q as before
        (and, for a subclass, its own constructor arguments as keywords)."""
        directory = Path(directory)
        try:
            state = json.loads((directory / LEDGER).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{directory / LEDGER} cannot be read: {error}") from None
        ledger = cls(model, loss_fn, test, state["hops"], optimizer=spec_from_dict(state["optimizer"]), mix_state=state["mix_state"],
                     replay_check=state["replay_check"], node_matrix=state["node_matrix"], q=q, **state["options"], **kwargs)
        if state["pending"]:
            pending = load_trajectory(directory / "pending", model, loss_fn, device=device)
            for t in pending.steps:
                rnd = pending[t]
                params = pending.params(t)
                if rnd.has_batch:
                    ledger.recorder.record(t, params, rnd.inputs, rnd.targets, rnd.lr, rnd.W, state=rnd.state)
                else:
                    ledger.recorder.record(t, params, state=rnd.state)
            like = pending[pending.steps[0]].params
            ledger.test = check_test(test, like)
            to = lambda values: None if values is None else torch.tensor(values, dtype=like.dtype, device=like.device)
            ledger.node_totals, ledger.matrix_totals = to(state["node_totals"]), to(state["matrix_totals"])
            grads = load_file(directory / "test_grads.safetensors")
            ledger._test_grads = {int(s): g.to(like.device) for s, g in grads.items()}
        ledger.scored_steps = state["scored_steps"]
        ledger.sample_totals = {int(k): v for k, v in state["sample_totals"].items()}
        ledger._sample_ids = {int(s): torch.tensor(ids) for s, ids in state["sample_ids"].items()}
        return ledger
